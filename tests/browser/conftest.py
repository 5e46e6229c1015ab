"""Real-browser tests: headless Debian Chromium driven by Playwright (sync API); skipped, with the reason, when either is missing.

Install both with `make test-browser` (apt-get chromium, pip playwright); `playwright install` is never needed."""
import importlib.util, json, os, shutil, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[2]
SITE = Path(os.environ.get('NAG_DOCS_SITE', ROOT / '_site_offline'))

CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync']

def missing()->str|None:
    "Why the browser tests cannot run here, or None."
    if shutil.which('chromium') is None: return 'chromium is not installed (apt-get install -y chromium, or `make test-browser`)'
    if importlib.util.find_spec('playwright') is None: return 'playwright is not installed (pip install playwright, or `make test-browser`)'
    return None

def pytest_collection_modifyitems(config, items):
    "Skip the tests of this folder, with the reason, where chromium or playwright is missing."
    reason = missing()
    if reason is None: return
    for item in items:
        if 'tests/browser' in str(item.path).replace('\\', '/'): item.add_marker(pytest.mark.skip(reason=reason))

@pytest.fixture(scope='session')
def browser():
    "One headless Chromium for the session (Debian's binary, no downloads)."
    reason = missing()
    if reason: pytest.skip(reason)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which('chromium'), headless=True, args=CHROMIUM_FLAGS)
        try: yield b
        finally: b.close()

@pytest.fixture(scope='session')
def site():
    "Render the site (tools/render_docs.py) and return its manifest."
    t0 = time.time()
    r = subprocess.run([sys.executable, 'tools/render_docs.py', '--out', str(SITE)], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    print(f"\ndocs: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ''} (wall {time.time() - t0:.1f} s)")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((SITE / 'manifest.json').read_text())
