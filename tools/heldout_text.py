"""Write the demo model's held-out text to a file: the documents tools/train_demo.py kept out of
training (every 50th of its Debian corpus, in corpus order), for `edgemoe calibrate`.

    python tools/heldout_text.py /tmp/heldout.txt
    edgemoe calibrate edgemoe/demo/demo.emoe --text /tmp/heldout.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_demo import documents, missing_packages, split  # noqa: E402


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["heldout.txt"])[0])
    missing = missing_packages()
    if missing:
        print(f"missing Debian packages; apt-get install -y {' '.join(missing)}", file=sys.stderr)
        return 2
    _, held = split(documents(), 50)
    out.write_text("\n\n".join(text for _, text in held))
    print(f"wrote {out}: {len(held)} documents, {out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
