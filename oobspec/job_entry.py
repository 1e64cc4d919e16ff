"""`python -m oobspec.job_entry ARGS`: what a Ray Jobs job runs on the cluster for `oob ARGS
--address http://HEAD:8265` (control/jobs.py submits it): the rendered spec, then the command."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .control.jobs import SPEC_ENV, SPEC_FILE, SPEC_PLACEHOLDER


def main(argv: list[str] | None = None) -> None:
    """The job's entrypoint on the cluster: write the rendered spec, run the command."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = os.environ.pop(SPEC_ENV, None)
    if text is not None and SPEC_PLACEHOLDER in args:
        path = Path.cwd() / SPEC_FILE
        path.write_text(text)
        args[args.index(SPEC_PLACEHOLDER)] = str(path)
    from .cli import main as cli_main
    cli_main(args)


if __name__ == "__main__":
    main()
