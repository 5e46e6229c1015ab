"""The offline docs site in a real browser: every page of tools/render_docs.py's rendering loads, shows no error
output, shows its figures, and its internal links resolve; the chapters show the API reference of their module.

The site is rendered into _site_offline/ (executed notebooks are cached there, so a second run only re-renders);
the time it took is printed."""
import ast, importlib, inspect, json, os, re, subprocess, sys, time, warnings
from pathlib import Path
from urllib.parse import urlparse, unquote
import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get('NAG_DOCS_SITE', ROOT / '_site_offline'))

CHECK_PAGE = """() => ({
  title: document.title,
  h1: (document.querySelector('main h1') || {}).innerText || '',
  outputs: [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.innerText).join('\\n'),
  stderr: [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.innerText),
  images: [...document.querySelectorAll('main img')].map(i => ({src: i.src.slice(0, 60), ok: i.complete && i.naturalWidth > 0})),
  links: [...document.querySelectorAll('a[href]')].map(a => ({raw: a.getAttribute('href'), url: a.href})),
})"""

def broken_links(links:list)->list:
    "Relative links whose target file does not exist (anchors ignored)."
    bad = []
    for l in links:
        raw = l['raw']
        if raw.startswith('#') or urlparse(raw).scheme: continue           # same-page anchors and absolute URLs
        u = urlparse(l['url'])
        if u.scheme == 'file' and not Path(unquote(u.path)).exists(): bad.append(raw)
    return bad

def page_problems(page, entry:dict)->list:
    "Everything wrong with one rendered page."
    errors = []
    on_error = lambda e: errors.append(str(e))
    page.on('pageerror', on_error)
    resp = page.goto((SITE / entry['html']).as_uri(), wait_until='load')
    info = page.evaluate(CHECK_PAGE)
    page.remove_listener('pageerror', on_error)
    problems = [] if resp is None or resp.ok else [f'load failed ({resp.status})']
    if not info['h1']: problems.append('no H1')
    if 'Traceback' in info['outputs'] or any('Traceback' in t for t in info['stderr']): problems.append('Traceback in the outputs')
    shown = sum(i['ok'] for i in info['images'])
    if shown < entry['images']: problems.append(f"{shown} of {entry['images']} figures shown")
    problems += [f"broken image {i['src']}" for i in info['images'] if not i['ok']]
    problems += [f'broken link {h}' for h in broken_links(info['links'])]
    problems += [f'script error {e}' for e in errors]
    return problems

def test_every_page_loads_without_errors_shows_its_figures_and_links_resolve(browser, site):
    t0 = time.time()
    assert site['pages'] and not [p['source'] for p in site['pages'] if p['error']]
    page, report = browser.new_page(), {}
    for entry in site['pages']:
        problems = page_problems(page, entry)
        if problems: report[entry['source']] = problems
    page.close()
    print(f"docs browser check: {len(site['pages'])} pages, {sum(p['images'] for p in site['pages'])} figures, {time.time() - t0:.1f} s")
    assert not report, json.dumps(report, indent=1)

def test_the_site_has_the_sidebar_sections_and_the_explorer_figure(site):
    sections = {p['section'] for p in site['pages']}
    assert {'Tutorials', 'Explanations', 'API'} <= sections
    explore = [p for p in site['pages'] if p['source'] == 'explore_nag.ipynb']
    assert explore and explore[0]['images'] >= 1            # the widget's PNG fallback
    assert (SITE / 'index.html').exists()

# ---- the API reference (nbdev's show_doc blocks)

API_PAGES = {'01_interpolants.html': 'nag_toolkit.interpolants', '04_samplers.html': 'nag_toolkit.samplers',
             '07_models.html': 'nag_toolkit.models', '15_study.html': 'nag_toolkit.study'}

READ_API = """() => [...document.querySelectorAll('div.nag-api')].map(d => {
  const r = d.getBoundingClientRect(), s = getComputedStyle(d);
  return {heading: ((d.querySelector('h3') || {}).innerText || '').replace('\u00b6', '').trim(),
          signature: (d.querySelector('pre') || {}).innerText || '', text: d.innerText,
          visible: r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && s.display !== 'none'};
})"""

def documented(module:str)->list:
    """What the chapter of `module` must document: the functions and classes of its `__all__`, and its `@patch`
    methods as Class.method, private ones (`_name`) excepted, as nbdev does."""
    from nbdev.doclinks import patch_name
    mod = importlib.import_module(module)
    names = [n for n in mod.__all__ if inspect.isfunction(getattr(mod, n)) or inspect.isclass(getattr(mod, n))]
    defs = [t for t in ast.parse(inspect.getsource(mod)).body if isinstance(t, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return names + [patch_name(t) for t in defs if patch_name(t) != t.name and not re.match(r'_(?!_)', t.name)]

def api_blocks(page, html_name:str)->dict:
    "{symbol: block} of the API blocks a page shows."
    page.goto((SITE / html_name).as_uri(), wait_until='load')
    return {b['heading']: b for b in page.evaluate(READ_API)}

def api_problems(blocks:dict, names:list)->list:
    "Exported symbols with no visible block, or whose block shows no signature of that name."
    out = []
    for n in names:
        b, short = blocks.get(n), n.split('.')[-1]
        if b is None: out.append(f'{n}: no API block'); continue
        if not b['visible']: out.append(f'{n}: its API block is not visible')
        if not re.search(rf'\b(def|class)\s+{re.escape(short)}\(', b['signature']): out.append(f'{n}: no signature')
    return out

def test_the_chapters_show_the_api_reference_of_every_exported_symbol(browser, site):
    page, report, counts = browser.new_page(), {}, {}
    for html_name, module in API_PAGES.items():
        blocks, names = api_blocks(page, html_name), documented(module)
        counts[html_name] = (len(blocks), len(names))
        if problems := api_problems(blocks, names): report[html_name] = problems
        if 'show_doc(' in page.inner_text('main'): report.setdefault(html_name, []).append('a show_doc call is shown')
    page.close()
    print(f'API blocks shown / exported symbols: {counts}')
    assert all(n >= 5 for _, n in counts.values()), counts
    assert not report, json.dumps(report, indent=1)

def test_sample_euler_shows_its_signature_parameters_and_docments(browser, site):
    from fastcore.docments import docments
    from nag_toolkit.samplers import sample_euler
    page = browser.new_page()
    b = api_blocks(page, '04_samplers.html').get('sample_euler')
    page.close()
    assert b and b['visible'], 'no visible API block for sample_euler'
    sig, dm = inspect.signature(sample_euler), docments(sample_euler)
    lines = {m.group(1): l for l in b['signature'].splitlines()[1:] if (m := re.match(r'\s+\**(\w+)', l))}
    for name, prm in sig.parameters.items():             # one line per parameter: name:type=default, # docments
        line = lines.get(name, '')
        assert line, f'{name} is not in the signature shown'
        if prm.annotation is not inspect.Parameter.empty:
            assert f'{name}:{prm.annotation}'.replace(' ', '') in line.replace(' ', ''), line
        if prm.default is not inspect.Parameter.empty: assert f'={prm.default!r}' in line, line
        if dm.get(name): assert line.rstrip().endswith(f'# {dm[name]}'), line
    assert sum(bool(dm.get(n)) for n in sig.parameters) >= 4                # the docments comments are there to check
    assert inspect.getdoc(sample_euler).split('`')[0] in b['text']           # the docstring
