"""The order saga with shipping as a sub-flow: book a carrier, print a label."""
