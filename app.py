"""Local web app: tune on a clip and edit it from new prompts, in the browser.

    python app.py                                   # http://127.0.0.1:7860
    python app.py --port 8000 --max-upload-mb 50 --max-clip-seconds 20

Jobs run one at a time as subprocesses of train_tuneavideo.py and inference.py; their files go under --root
(./outputs). Base models are the Stable Diffusion folders under --checkpoints; with none there, the tiny random model
is written to <checkpoints>/tiny-sd (random weights give noise, not pictures). Ctrl-C stops the running job with a
checkpoint, then the server. -v shows the libraries' own logs and warnings, here and in the jobs' logs.
"""

import argparse
import os
from pathlib import Path

from tuneavideo.app.page import launch
from tuneavideo.app.workspace import Workspace
from tuneavideo.cli import setup_terminal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--root", type=Path, default=Path("outputs"), help="where jobs write (default: ./outputs)")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"), help="base models (./checkpoints)")
    parser.add_argument("--data", type=Path, default=Path("data"), help="clips offered in the page (./data)")
    parser.add_argument("--max-upload-mb", type=float, default=200, help="largest upload (default: 200 MB)")
    parser.add_argument("--max-clip-seconds", type=float, default=60, help="longest clip (default: 60 s)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the libraries' own logs and warnings, here and in the jobs' logs")
    args = parser.parse_args(argv)
    setup_terminal(args.verbose)
    # Gradio keeps uploads and the files it serves in its cache; keep it under the root too (unless set elsewhere).
    os.environ.setdefault("GRADIO_TEMP_DIR", str((args.root / ".gradio").resolve()))
    workspace = Workspace(root=args.root.resolve(), checkpoints=args.checkpoints.resolve(), data=args.data.resolve(),
                          max_upload_bytes=int(args.max_upload_mb * 2**20), max_clip_seconds=args.max_clip_seconds)
    launch(workspace, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
