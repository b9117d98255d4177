"""Failing on purpose, for tests of failure detection: ``DEJAVU_FAULT="rank=1,at=decode,step=2,how=exit"``.

``at`` is startup, prefill, admit or decode; ``step`` (decode only) is the decode step; ``how`` is exit
(the process dies at once, as on a lost machine), raise (an exception, reported to the controller) or
hang (the main thread stops making progress while the heartbeat goes on).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

WHERE = ("startup", "prefill", "admit", "decode")
HOW = ("exit", "raise", "hang")
EXIT_CODE = 17


@dataclass(frozen=True)
class Fault:
    at: str
    step: int = 0
    how: str = "exit"

    def check(self, at: str, step: int = 0) -> None:
        if at != self.at or (at == "decode" and step != self.step):
            return
        if self.how == "exit":
            os._exit(EXIT_CODE)
        if self.how == "hang":
            while True:
                time.sleep(3600)
        raise RuntimeError(f"injected fault at {at} step {step} (DEJAVU_FAULT)")


def from_env(rank: int) -> Fault | None:
    spec = os.environ.get("DEJAVU_FAULT", "").strip()
    if not spec:
        return None
    try:
        fields = dict(part.split("=", 1) for part in spec.split(","))
        fault = Fault(fields.get("at", "startup"), int(fields.get("step", 0)), fields.get("how", "exit"))
        target = int(fields["rank"])
    except (ValueError, KeyError):
        raise ValueError(f"DEJAVU_FAULT={spec!r} is malformed; expected e.g. 'rank=1,at=decode,step=2,how=exit'") from None
    if fault.at not in WHERE or fault.how not in HOW:
        raise ValueError(f"DEJAVU_FAULT={spec!r}: at must be one of {WHERE}, how one of {HOW}")
    return fault if target == rank else None
