"""Results people look at, in a real browser: the docs' index page (the README) shows the hero figure and the
generated tables, and a study's summary.html shows its figures and its coloured verdict table."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get('NAG_DOCS_SITE', ROOT / '_site_offline'))

READ = """() => ({
  images: [...document.querySelectorAll('img')].map(i => ({src: i.getAttribute('src').slice(0, 40),
                                                           ok: i.complete && i.naturalWidth > 0})),
  tables: [...document.querySelectorAll('table')].map(t => t.querySelectorAll('tr').length),
  coloured: [...document.querySelectorAll('table.verdicts td')].filter(td => td.style.background).length,
  text: document.body.innerText,
})"""

def test_the_index_shows_the_hero_figure_and_the_generated_tables(browser, site):
    page = browser.new_page()
    page.goto((SITE / 'index.html').as_uri(), wait_until='load')
    seen = page.evaluate(READ)
    page.close()
    if (ROOT / 'findings' / 'demo_hero.png').exists():
        assert any(i['ok'] for i in seen['images']), seen['images']            # the hero figure, embedded
    assert all(i['ok'] for i in seen['images']), seen['images']
    # the demo's verdict tables (one per study) and the two maps' counts, each with rows
    assert len([n for n in seen['tables'] if n > 2]) >= 2, seen['tables']
    assert 'equal NFE' in seen['text'] and 'Quick start' in seen['text']

@pytest.fixture(scope='module')
def study(tmp_path_factory):
    "A quick study (in-process pipelines, about a minute on 2 cores)."
    out = tmp_path_factory.mktemp('study') / 's'
    r = subprocess.run([sys.executable, '-m', 'nag_toolkit.cli', 'study', '--quick', '--no-notebooks', '--out', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    return out

def test_a_study_summary_shows_its_figures_and_its_verdict_table(browser, study):
    page = browser.new_page()
    page.goto((study / 'summary.html').as_uri(), wait_until='load')
    seen = page.evaluate(READ)
    page.close()
    assert len(seen['images']) >= 6 and all(i['ok'] for i in seen['images']), seen['images']
    assert any('pareto' in i['src'] for i in seen['images'])
    groups = json.loads((study / 'findings.json').read_text())
    methods = {g['method'] for g in groups if g['method'] != 'floor'}
    assert seen['tables'] and seen['tables'][0] >= len(methods) + 1          # the verdicts lead: a row per method
    assert seen['coloured'] > 0                                                # better / worse / no difference
    assert 'Verdicts' in seen['text'] and 'Quality against compute' in seen['text']
