"""Render the notebooks of nbs/ to an offline HTML site: one page per notebook, a sidebar from nbs/sidebar.yml.

Where Quarto is installed, `nbdev_docs` builds the real site. This is the check that works everywhere (no Quarto, no
network): notebooks with outputs (executed on purpose, like explore_nag.ipynb with its widget state) are taken as they
are; the others are executed with nbdev's execnb, skipping the cells nbdev_test skips (`#| eval: false` and the
`tst_flags` of settings.ini: slow, gpu). Executed notebooks are cached under OUT/.cache, keyed by the notebook and the
library's source, so a second run only renders. Pages get nbconvert's HTMLExporter (lab template, with nothing
loaded from a CDN); `.ipynb` links become `.html`; a live widget's output shows its PNG fallback.

The API reference comes as on nbdev's Quarto site: nbdev's own `add_show_docs` processor puts a `show_doc(symbol)`
cell after each exported cell, for each function and class it defines (methods attached with `@patch` as
`Class.method`); the cell runs with the notebook and its output (signature, docstring, each parameter's type, default
and docments comment) is shown, without the call, in a `<div class="nag-api" data-symbol="...">` block.

    python tools/render_docs.py [--out _site_offline] [--only 01_interpolants.ipynb ...] [--no-exec] [--workers 2]

OUT/manifest.json lists every page (source, html, section, title, image outputs, execution seconds, error)."""
import argparse, concurrent.futures as cf, configparser, hashlib, html, json, os, re, shutil, sys, time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
IMAGE_TYPES = ('image/png', 'image/jpeg', 'image/svg+xml')
WIDGET_VIEW = 'application/vnd.jupyter.widget-view+json'

# ---- which pages, in which sections

def all_notebooks()->list:
    "Every notebook under nbs/ (relative paths), skipping names starting with _ or . and checkpoints."
    return sorted(str(p.relative_to(NBS)) for p in NBS.rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(NBS).parts))

def sidebar_sections(path:Path=NBS / 'sidebar.yml')->list:
    "[(section title or None, [notebook paths])] from the Quarto sidebar, in its order."
    import yaml
    out, top = [], []
    for entry in yaml.safe_load(path.read_text())['website']['sidebar']['contents']:
        if isinstance(entry, str): top.append(entry)
        else: out.append((entry['section'], [c if isinstance(c, str) else c['href'] for c in entry.get('contents', [])]))
    return [(None, top)] + out

def page_sections(notebooks:list)->list:
    "The sidebar's sections restricted to `notebooks`, plus 'More' for notebooks the sidebar does not list."
    secs = [(t, [n for n in nbs if n in notebooks]) for t, nbs in sidebar_sections()]
    listed = {n for _, nbs in secs for n in nbs}
    return [s for s in secs if s[1]] + ([('More', [n for n in notebooks if n not in listed])] if set(notebooks) - listed else [])

def html_name(nb:str)->str: return 'index.html' if nb == 'index.ipynb' else nb[:-len('.ipynb')] + '.html'

# ---- execution (execnb, as nbdev_test runs notebooks)

def skip_flags()->set:
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    return set(cfg['DEFAULT'].get('tst_flags', '').split())

def has_outputs(nb:dict)->bool:
    return any(c.get('outputs') for c in nb['cells'] if c['cell_type'] == 'code')

def cache_key(nb)->str:
    """Hash of the notebook to run (show_doc cells included), the library's source, the skip flags and the versions of
    the packages that write the API blocks: an executed copy is valid while they hold."""
    from importlib.metadata import version
    from execnb.nbio import nb2str
    h = hashlib.sha256(nb2str(nb).encode())
    for p in sorted((ROOT / 'nag_toolkit').rglob('*.py')): h.update(p.read_bytes())
    h.update(' '.join(sorted(skip_flags())).encode())
    h.update(' '.join(version(p) for p in ('nbdev', 'fastcore', 'execnb')).encode())
    return h.hexdigest()[:20]

def skipped(cell, flags:set)->bool:
    "Whether nbdev_test would skip this cell: markdown, `#| eval: false`, or a flag of `tst_flags`."
    if cell.cell_type != 'code': return True
    d = directives(cell.source)
    return d.get('eval:', [''])[0].lower() == 'false' or bool(flags & d.keys())

API_TAG = 'nag-api'          # the tag of the show_doc cells, and the CSS class of the block their output becomes

def in_definition_order(cells:list)->list:
    "add_show_docs inserts a cell's show_doc cells last symbol first: each run of them reversed, to the source's order."
    out, run = [], []
    for c in cells + [None]:
        if c is not None and c.get('has_sd'): run.append(c); continue
        out += run[::-1] + ([c] if c is not None else []); run = []
    return out

def with_show_docs(nb_path:Path):
    """The notebook (execnb's form) with nbdev's `show_doc(symbol)` cell after each exported cell, tagged `API_TAG`;
    a show_doc cell carries its exported cell's skip directives, so it is skipped where that cell is."""
    from execnb.nbio import read_nb
    from nbdev.process import NBProcessor
    from nbdev.processors import add_show_docs
    nb, flags, src = read_nb(nb_path), skip_flags() | {'eval:'}, None
    NBProcessor(nb=nb, procs=[add_show_docs], rm_directives=False).process()
    nb.cells = in_definition_order(nb.cells)
    for i, c in enumerate(nb.cells): c.idx_ = i
    for c in nb.cells:
        if not c.get('has_sd'): src = c; continue
        skips = [l for l in src.source.splitlines() if l.startswith('#|') and set(directives(l)) & flags]
        c.id = 'showdoc-' + hashlib.sha1(c.source.encode()).hexdigest()[:12]   # mk_cell's id is random: uncacheable
        c.source = '\n'.join(skips + [c.source])
        c.metadata['tags'] = [API_TAG]
    return nb

def execute(nb, nb_path:Path, dest:Path)->dict:
    """Run the notebook `nb` (read from `nb_path`) with execnb in its folder (skipping what nbdev_test skips) and
    write it to `dest`."""
    from execnb.nbio import write_nb
    from execnb.shell import CaptureShell
    flags, t0, err, cwd, main = skip_flags(), time.time(), None, os.getcwd(), sys.modules['__main__']
    try:
        os.chdir(nb_path.parent)
        shell = CaptureShell(nb_path)
        shell.run_cell('from nbdev.showdoc import show_doc')
        shell.run_all(nb, exc_stop=True, preproc=lambda c: skipped(c, flags))
    except BaseException as e: err = f'{type(e).__name__}: {str(e)[:300]}'
    finally: os.chdir(cwd); sys.modules['__main__'] = main          # IPython swaps __main__; the pool needs it back
    dest.parent.mkdir(parents=True, exist_ok=True); write_nb(nb, dest)
    return {'seconds': round(time.time() - t0, 2), 'error': err}

def executed(nb:str, out:Path, run:bool)->tuple:
    "(path of the notebook to render, info): as it is, from the cache, or freshly executed (failures are not cached)."
    src = NBS / nb
    if not run or has_outputs(json.loads(src.read_text())): return src, {'executed': False, 'cached': False, 'seconds': 0.0, 'error': None}
    to_run = with_show_docs(src)
    dest = out / '.cache' / f'{nb[:-6]}.{cache_key(to_run)}.ipynb'
    meta = dest.with_suffix('.json')
    if dest.exists() and meta.exists(): return dest, {**json.loads(meta.read_text()), 'cached': True}
    for stale in dest.parent.glob(f'{Path(nb).stem}.*'): stale.unlink()       # older executions of this notebook
    info = {'executed': True, **execute(to_run, src, dest)}
    if not info['error']: meta.write_text(json.dumps(info))
    return dest, {**info, 'cached': False}

def _executed_job(args):
    nb, out, run = args
    path, info = executed(nb, out, run)
    return nb, str(path), info

# ---- rendering

def directives(src:str)->dict:
    "The leading `#|` directives of a cell: {name: [values]}."
    d = {}
    for line in src.splitlines():
        if not line.startswith('#|'): break
        parts = line[2:].split()
        if parts: d[parts[0]] = parts[1:]
    return d

SOURCE_LINK = re.compile(r'^\[source\]\(\S*\)\{[^}]*\}\s*$', re.M)   # show_doc's link to GitHub, in Quarto's syntax

def api_block(cell)->list:
    """The outputs of a show_doc cell as one HTML block, `<div class="nag-api" data-symbol=NAME>`: show_doc's markdown
    (signature with the docments of each parameter, docstring) rendered, without the link to the online source."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune
    m = re.search(r'show_doc\(([\w.]+)\)', cell.source)
    mds = [o['data']['text/markdown'] for o in cell.outputs if 'text/markdown' in o.get('data', {})]
    if not (m and mds): return cell.outputs
    body = ''.join(markdown2html_mistune(SOURCE_LINK.sub('', md).replace('---\n', '', 1).strip()) for md in mds)
    div = f'<div class="{API_TAG}" data-symbol="{html.escape(m.group(1))}">{body}</div>'
    return [{'output_type': 'display_data', 'metadata': {}, 'data': {'text/html': div}}]

def prepare(nb):
    """Cells as the docs show them: hidden cells dropped, directive lines removed, echo/output directives applied,
    show_doc cells shown as their API block."""
    import nbformat
    cells = []
    for c in nb.cells:
        d = directives(c.source)
        if 'hide' in d or d.get('include:') == ['false']: continue
        if API_TAG in c.metadata.get('tags', []):
            if not c.outputs: continue                                  # its exported cell was skipped (slow, gpu)
            c.outputs, c.metadata['tags'] = nbformat.from_dict(api_block(c)), [API_TAG, 'remove_input']
        c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith('#|')).strip('\n')
        if c.cell_type == 'code':
            if d.get('echo:') == ['false']: c.metadata['tags'] = ['remove_input']
            if d.get('output:') == ['false']: c.outputs = []
            for o in c.outputs:                                   # a widget's view cannot run offline: show its PNG
                if WIDGET_VIEW in o.get('data', {}) and set(o['data']) & set(IMAGE_TYPES): del o['data'][WIDGET_VIEW]
            if not c.source and not c.outputs: continue
        cells.append(c)
    nb.cells = cells
    nb.metadata.pop('widgets', None)
    return nb

def image_outputs(nb)->int:
    return sum(bool(set(o.get('data', {})) & set(IMAGE_TYPES)) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)

def title_of(nb)->str:
    "The first H1 of the notebook's first markdown cell."
    for c in nb.cells:
        if c.cell_type == 'markdown':
            m = re.search(r'^#\s+(.+)$', c.source, re.M)
            if m: return m.group(1).strip()
    return ''

TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock -%}
{%- block html_head_js_mathjax -%}{%- endblock -%}
{%- block html_head_js_mermaidjs -%}{%- endblock -%}
{% block extra_css %}<style>
nav.offline-nav {position: fixed; top: 0; left: 0; bottom: 0; width: 230px; overflow-y: auto; padding: 12px; font: 13px sans-serif; background: #f7f7f7; border-right: 1px solid #ddd;}
nav.offline-nav h4 {margin: 14px 0 4px;} nav.offline-nav ul {list-style: none; padding-left: 8px; margin: 0;} nav.offline-nav li {margin: 3px 0;}
nav.offline-nav a.current {font-weight: bold;} body.jp-Notebook main {margin-left: 250px;}
div.nag-api {border: 1px solid #ccd; border-radius: 6px; padding: 2px 14px; background: #fafbff;}
div.nag-api h3 {margin-top: 8px;}
div.nag-api pre {white-space: pre-wrap; font-family: var(--jp-code-font-family, monospace);}
</style>{% endblock extra_css %}
{%- block body_header -%}<body class="jp-Notebook" data-jp-theme-light="true" data-jp-theme-name="JupyterLab Light">
<nav class="offline-nav">{{ resources.sidebar_html }}</nav><main>{%- endblock body_header -%}
"""

def exporter():
    "nbconvert's HTMLExporter with the offline template (nothing from a CDN) and the remove_input tag honoured."
    import jinja2
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    c = Config({'TagRemovePreprocessor': {'enabled': True, 'remove_input_tags': ['remove_input']}})
    return HTMLExporter(config=c, extra_loaders=[jinja2.DictLoader({'offline.html.j2': TEMPLATE})], template_file='offline.html.j2')

def sidebar_html(sections:list, titles:dict, page:str)->str:
    "The navigation of one page, with links relative to its folder."
    here, parts = Path(html_name(page)).parent, []
    for title, nbs in sections:
        if title: parts.append(f'<h4>{html.escape(title)}</h4>')
        items = ''.join(f'<li><a href="{os.path.relpath(html_name(n), here)}"{" class=current" if n == page else ""}>{html.escape(titles[n] or n)}</a></li>' for n in nbs)
        parts.append(f'<ul>{items}</ul>')
    return '\n'.join(parts)

def relink(page_html:str)->str:
    "Links to notebooks become links to their pages (index.ipynb to index.html)."
    return re.sub(r'href="([^":#?]*?)\.ipynb(#[^"]*)?"', lambda m: f'href="{m.group(1)}.html{m.group(2) or ""}"', page_html)

# ---- the site

def render_site(out:Path, only=None, run:bool=True, workers:int=2)->dict:
    "Execute (or reuse) and render every notebook; write the pages, manifest.json, and return the manifest."
    import nbformat
    t0, notebooks = time.time(), all_notebooks()
    pages = [n for n in notebooks if not only or n in only]
    out.mkdir(parents=True, exist_ok=True)
    with cf.ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        done = {nb: (Path(p), info) for nb, p, info in pool.map(_executed_job, [(nb, out, run) for nb in pages])}
    t_exec = time.time() - t0
    nbs = {nb: prepare(nbformat.read(done[nb][0], as_version=4)) for nb in pages}
    titles, sections = {nb: title_of(nbs[nb]) for nb in pages}, page_sections(pages)
    ex, manifest = exporter(), {'pages': []}
    for sec, members in sections:
        for nb in members:
            body, _ = ex.from_notebook_node(nbs[nb], resources={'sidebar_html': sidebar_html(sections, titles, nb), 'metadata': {'name': titles[nb] or nb}})
            dest = out / html_name(nb); dest.parent.mkdir(parents=True, exist_ok=True); dest.write_text(relink(body))
            manifest['pages'].append({'source': nb, 'html': html_name(nb), 'section': sec, 'title': titles[nb], 'images': image_outputs(nbs[nb]), **done[nb][1]})
    manifest.update(seconds_total=round(time.time() - t0, 1), seconds_exec=round(t_exec, 1), seconds_render=round(time.time() - t0 - t_exec, 1))
    (out / 'manifest.json').write_text(json.dumps(manifest, indent=1))
    return manifest

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(ROOT / '_site_offline'), help='the site folder (default: _site_offline)')
    ap.add_argument('--only', nargs='*', help='render only these notebooks (paths relative to nbs/)')
    ap.add_argument('--no-exec', action='store_true', help='render the notebooks as they are, without executing any')
    ap.add_argument('--workers', type=int, default=2, help='notebooks executed at once')
    a = ap.parse_args()
    m = render_site(Path(a.out), a.only, not a.no_exec, a.workers)
    fresh = [p for p in m['pages'] if p.get('executed') and not p.get('cached')]
    for p in sorted(fresh, key=lambda p: -p['seconds'])[:8]: print(f"  executed {p['source']}: {p['seconds']:.1f} s")
    errors = [p for p in m['pages'] if p.get('error')]
    for p in errors: print(f"  ERROR in {p['source']}: {p['error']}", file=sys.stderr)
    print(f"rendered {len(m['pages'])} pages to {a.out} in {m['seconds_total']} s (execution {m['seconds_exec']} s, "
          f"{len(fresh)} notebooks run, the rest cached or already executed; rendering {m['seconds_render']} s)")
    sys.exit(1 if errors else 0)

if __name__ == '__main__': main()
