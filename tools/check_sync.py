"""Fail when the notebooks are not clean, or the library or README.md is not what the notebooks make."""
import hashlib, subprocess, sys
from pathlib import Path

def snapshot(root):
    files = sorted(Path(root, 'nag_toolkit').rglob('*.py')) + sorted(Path(root, 'nbs').rglob('*.ipynb')) + [Path(root, 'README.md')]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists() and '.ipynb_checkpoints' not in str(p)}

def main():
    root = Path(__file__).resolve().parent.parent
    before = snapshot(root)
    for cmd in (['nbdev_clean'], ['nbdev_export'], [sys.executable, 'tools/make_readme.py']):
        subprocess.run(cmd, cwd=root, check=True)
    after = snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        print('out of sync: nbdev_clean/nbdev_export changed ' + ', '.join(changed) +
              ' (edit the notebooks, not nag_toolkit/*.py or README.md; then run `make sync` again and commit)')
        sys.exit(1)
    print('sync ok: notebooks clean, library matches the notebooks')

if __name__ == '__main__': main()
