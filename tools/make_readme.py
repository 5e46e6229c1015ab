"""Write README.md from nbs/index.ipynb (executed), the way nbdev_readme does where Quarto is installed."""
import os, re
from pathlib import Path
import nbformat
from execnb.shell import CaptureShell

def render(nb_path):
    nb = nbformat.read(nb_path, as_version=4)
    shell = CaptureShell(path=nb_path.parent)
    out = []
    for cell in nb.cells:
        src = cell.source.strip()
        if cell.cell_type == 'markdown': out.append(src); continue
        if src.startswith('#|') and 'hide' in src.splitlines()[0]: continue
        outputs = shell.run(src)
        markdown = [o['data']['text/markdown'] for o in outputs if 'text/markdown' in o.get('data', {})]
        if markdown:                     # a cell that displays Markdown (the benchmark table) shows just that
            out.extend(m if isinstance(m, str) else ''.join(m) for m in markdown); continue
        out.append(f'```python\n{src}\n```')
        text = [o.get('data', {}).get('text/plain') or o.get('text') for o in outputs]
        text = [t if isinstance(t, str) else ''.join(t) for t in text if t]
        if text: out.append('    ' + '\n    '.join('\n'.join(text).splitlines()))
    md = '\n\n'.join(out) + '\n'
    return re.sub(r'\n{3,}', '\n\n', md)

if __name__ == '__main__':
    os.environ['NAG_TOOLKIT_README'] = '1'          # cells that show a figure link it instead of embedding it
    root = Path(__file__).resolve().parent.parent
    (root / 'README.md').write_text(render(root / 'nbs' / 'index.ipynb'))
    print('wrote README.md')
