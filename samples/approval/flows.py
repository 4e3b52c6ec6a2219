"""An expense claim: submit it, have it approved, pay it out.

    ExpenseClaim: Submit -> Approve -> PayOut

Claims up to 100.00 are approved at once. A bigger one fails the Approve step
until someone approves it; ``on_failure=qwit.WAIT`` parks the flow instead of
rolling it back, and an operator decides:

    qwit react FLOW_ID retry --args '{"approved": true}'    # approve: Approve runs again
    qwit react FLOW_ID rollback                             # reject: the claim is withdrawn
"""

from __future__ import annotations

from typing import Any

import qwit

#: Claims up to this many cents need no manager.
AUTO_APPROVE_CENTS = 100_00


class Submit(qwit.Step, name="expenses.submit"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"claim": f"claim-{args['employee']}-{args['cents']}"}

    def step_back(self, args: dict[str, Any]) -> None:
        # A real system would mark the claim withdrawn, with the reason.
        pass


class Approve(qwit.Step, name="expenses.approve"):
    retry = qwit.Retry(max_attempts=1)  # waiting for a person: no point retrying
    on_failure = qwit.WAIT

    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        if args["cents"] <= AUTO_APPROVE_CENTS:
            return {"approved_by": "policy"}
        if args.get("approved"):
            return {"approved_by": args.get("approver", "manager")}
        raise qwit.StepError(
            f"{args['claim']}: {args['cents'] / 100:.2f} needs a manager's approval"
        )


class PayOut(qwit.Step, name="expenses.pay"):
    def step_forward(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"paid": args["cents"]}


class ExpenseClaim(qwit.Flow, name="expenses.claim"):
    def build_flow(self) -> None:
        self.step(Submit)
        self.step(Approve)
        self.step(PayOut)
