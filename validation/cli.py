"""validation's commands: `rkvsim validate` (step throughput against measured engine data) and
`rkvsim validate-serving` (a real server under load). Mounted by rkvsim.cli.main."""
from __future__ import annotations

from rkvsim.validation import attention_transfer, serving_cli, steps_cli


def add_parser(sub) -> None:
    steps_cli.add_parser(sub)      # validate
    serving_cli.add_parser(sub)    # validate-serving
    attention_transfer.add_parser(sub)   # validate-transfer
