"""Flows whose Steps name an engine (``backend=``), for ``qwit run --backend``:
a Step may run only on the engine its flow runs on."""

from __future__ import annotations

from typing import Any

import qwit
import qwit.postgres


class OnPostgres(qwit.Step, name="engines.on_postgres", backend=qwit.postgres):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ran_on": "postgres"}


class OnTemporal(qwit.Step, name="engines.on_temporal", backend=qwit.temporal):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"ran_on": "temporal"}


class PostgresStep(qwit.Flow, name="engines.postgres_step"):
    """No backend= of its own: it runs on the command line's --backend."""

    def build_flow(self) -> None:
        self.step(OnPostgres)


class TemporalStep(qwit.Flow, name="engines.temporal_step"):
    """No backend= of its own: it runs on the command line's --backend."""

    def build_flow(self) -> None:
        self.step(OnTemporal)
