"""The order saga: reserve inventory, charge payment, create a shipment."""
