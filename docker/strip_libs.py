"""Strip the symbol tables of a virtualenv's shared libraries (libtorch_cpu alone: 415 -> 330 MB), keeping a
library as it was when the stripped one no longer loads: auditwheel's patchelf-ed libraries (numpy's OpenBLAS)
can break ("ELF load command address/offset not page-aligned").

    python strip_libs.py /opt/venv      (docker/Dockerfile, where the base has binutils' strip)
"""

import shutil
import subprocess
import sys
from pathlib import Path

LOADS = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"


def main(root: Path) -> None:
    saved, kept = 0, []
    for path in sorted(p for p in root.rglob("*.so*") if p.is_file() and not p.is_symlink() and not p.name.endswith(".orig")):
        backup = path.with_name(path.name + ".orig")
        shutil.copy2(path, backup)
        before = path.stat().st_size
        stripped = subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True).returncode == 0
        if stripped and subprocess.run([sys.executable, "-c", LOADS, str(path)], capture_output=True).returncode == 0:
            saved += before - path.stat().st_size
            backup.unlink()
        else:
            backup.replace(path)
            kept.append(path.name)
    print(f"strip: {saved / 1e6:.0f} MB saved; kept as they were: {', '.join(kept) or 'none'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
