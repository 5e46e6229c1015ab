"""The offline docs site in a real browser: every page of tools/render_docs.py's rendering loads, shows no error
output, shows its figures, and its internal links resolve.

The site is rendered into _site_offline/ (executed notebooks are cached there, so a second run only re-renders);
the time it took is printed."""
import json, os, subprocess, sys, time, warnings
from pathlib import Path
from urllib.parse import urlparse, unquote
import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get('NAG_DOCS_SITE', ROOT / '_site_offline'))

@pytest.fixture(scope='session')
def site():
    "Render the site (tools/render_docs.py) and return its manifest."
    t0 = time.time()
    r = subprocess.run([sys.executable, 'tools/render_docs.py', '--out', str(SITE)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    print(f"\ndocs: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''} (wall {time.time() - t0:.1f} s)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((SITE / 'manifest.json').read_text())

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
