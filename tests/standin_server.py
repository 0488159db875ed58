"""A real ``med3dvlm serve`` process (the package's own app, uvicorn, loopback HTTP) whose model is
the stand-in of slicer_standin.py: slow or crashing on demand, for the server and Slicer tests.

    python tests/standin_server.py --ready-file F [--token-delay S] [--die-after N] [--load-delay S] ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from med3dvlm.errors import ModelError  # noqa: E402
from med3dvlm.server.config import ServerConfig, resolve_token  # noqa: E402
from med3dvlm.server.serve import serve  # noqa: E402
from slicer_standin import StandInPipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token-delay", type=float, default=0.002)
    parser.add_argument("--report-words", type=int, default=24)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--load-delay", type=float, default=0.0)
    parser.add_argument("--load-error", default=None, help="loading fails with this ModelError message")
    parser.add_argument("--model", default="demo", help="'demo' or an existing folder, as the real server needs")
    parser.add_argument("--scores", default=None, help='JSON {"organ|kind": probability}')
    parser.add_argument("--max-volume-mb", type=float, default=64)
    parser.add_argument("--max-waiting", type=int, default=32)
    parser.add_argument("--allow-folder", default=None)
    args = parser.parse_args()

    scores = None
    if args.scores:
        scores = {tuple(key.split("|")): value for key, value in json.loads(args.scores).items()}

    def load():
        time.sleep(args.load_delay)
        if args.model != "demo" and not Path(args.model).is_dir():
            raise ModelError(f"Model folder {args.model} does not exist; pass 'demo' or a folder holding "
                             "config.json and *.safetensors.")
        if args.load_error:
            raise ModelError(args.load_error)
        return StandInPipeline(token_delay=args.token_delay, report_words=args.report_words, scores=scores,
                               die_after=args.die_after)

    token, _ = resolve_token(args.host)
    folder = Path(args.allow_folder).resolve() if args.allow_folder else None
    config = ServerConfig(token=token, max_volume_bytes=int(args.max_volume_mb * 2**20), allowed_folder=folder,
                          max_waiting=args.max_waiting)
    serve(load, config, host=args.host, port=0, model_label="stand-in", ready_file=args.ready_file,
          exit_with_stdin=True, log_level="info")  # info: the log tests see what operators see


if __name__ == "__main__":
    main()
