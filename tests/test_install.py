"""Installs and caches: read-only installs, unwritable HOME, concurrent cache writers.

* ``import fastbn`` and a first call (which compiles the Numba kernels) work
  from a fresh venv whose installed package is read-only, with an unwritable
  ``HOME`` and no ``NUMBA_CACHE_DIR``/``FASTBN_CACHE_DIR``: the kernels cache
  in a private per-user directory under the temp dir, and nothing is written
  into the package.  The child runs as ``nobody`` (``setpriv``), since root
  ignores file modes; where even the temp dirs are read-only (a mount
  namespace with read-only bind mounts) it runs without a cache.
* A per-user temp cache directory that someone else made (or that others can
  write) is never used: cached machine code from it would run in our process.
* Two processes compiling into the same fresh ``FASTBN_CACHE_DIR`` at once
  both get correct results, and a third process then loads the kernels from
  that cache (no compilation) and gets the same results.

Each case is skipped, with the reason, where this machine cannot set it up.
"""

import base64
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time

import numpy as np
import pytest

import fastbn
import fastbn.kernels

pytestmark = pytest.mark.integration

NOBODY = 65534
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")
numba_only = pytest.mark.skipif(fastbn.backends()["numba"] != "available",
                                reason="the Numba backend (what compiles, caches) is not available")

#: The work of a child: a first call of public functions on small inputs (each
#: compiles a kernel or two).  ``LIGHT``: moments only (two kernels).
_WORK = textwrap.dedent("""
    import numpy as np
    import fastbn as fbn
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 3, 5, 7)).astype(np.float32) + 10
    res = {}
    res["mean"], res["var"] = fbn.moments(x, (0, 2, 3))
    if not LIGHT:
        dy = rng.standard_normal(x.shape).astype(np.float32)
        s = np.linspace(0.5, 2, 3).astype(np.float32)
        res["y"], m, inv = fbn.batch_norm_train(x[:, :, ::2], s, s, eps=1e-3)
        res["dx"], res["ds"], res["do"] = fbn.batch_norm_backward(dy, x, s, m, inv)
""")

#: A child process: argv[1] where to save the results (or "-"), argv[2] "light" or
#: not; prints (last line) what it imported and how the Numba cache served it.
_CHILD = textwrap.dedent("""
    import json, os, sys
    LIGHT = len(sys.argv) > 2 and sys.argv[2] == "light"
""") + _WORK + textwrap.dedent("""
    from fastbn.kernels import _jit, cpu_numba
    if sys.argv[1] != "-":
        np.savez(sys.argv[1], **res)
    kernels = [k for k in vars(cpu_numba).values() if isinstance(k, _jit.Kernel)]
    stats = [d.stats for k in kernels for d in (k.serial, k.parallel)]
    print(json.dumps(dict(
        fastbn=os.path.dirname(fbn.__file__), backend=fbn.backend_for(x),
        cache_dir=_jit.cache_dir(), uid=os.getuid(),
        hits=sum(sum(st.cache_hits.values()) for st in stats),
        misses=sum(sum(st.cache_misses.values()) for st in stats))))
""")

_EXPECTED = {}


def _expected(light=False):
    """The children's results, computed in this process."""
    if light not in _EXPECTED:
        ns = {"LIGHT": light}
        exec(_WORK, ns)  # noqa: S102 - our own code, run here as in the children
        _EXPECTED[light] = ns["res"]
    return _EXPECTED[light]


def _last_json(text):
    import json
    return json.loads(text.strip().splitlines()[-1])


def _copy_installed(dst):
    """The installed package (fastbn + compiled kernels, no caches) copied to dst/fastbn."""
    pkg = os.path.dirname(os.path.abspath(fastbn.__file__))
    kern = os.path.dirname(os.path.abspath(fastbn.kernels.__file__))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "*.c", "*.html")
    shutil.copytree(pkg, os.path.join(dst, "fastbn"), ignore=ignore)
    if kern != os.path.join(pkg, "kernels"):  # an editable install maps ./kernels there
        shutil.copytree(kern, os.path.join(dst, "fastbn", "kernels"), ignore=ignore,
                        dirs_exist_ok=True)


def _fresh_venv(root):
    """A fresh venv at root/venv with a read-only copy of the installed fastbn; its other
    packages (numpy, numba) come from this environment through a .pth file.  Returns
    (python, the copied package dir)."""
    venv = os.path.join(root, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # (paths in a .pth are appended after the venv's own site-packages, and .pth files
    # inside them are not run: an editable install's finder stays out of the child)
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
            os.path.dirname(os.path.dirname(np.__file__))}
    with open(os.path.join(site, "outer_env.pth"), "w") as f:
        f.write("\n".join(sorted(deps)) + "\n")
    _copy_installed(site)
    return python, os.path.join(site, "fastbn")


def _read_only(path):
    """Remove every write bit under path (for a non-root user; root needs more)."""
    for d, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                os.chmod(p, os.stat(p).st_mode & 0o555)
    os.chmod(path, os.stat(path).st_mode & 0o555)


def _listing(path):
    return sorted(os.path.relpath(os.path.join(d, f), path)
                  for d, _, files in os.walk(path) for f in files)


def _drop_privileges():
    """A command prefix that runs a process as an unprivileged user, or None with a reason."""
    if os.geteuid() != 0:
        return [], None
    if SETPRIV is None:
        return None, "running as root and setpriv is not installed (root ignores file modes)"
    prefix = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    probe = subprocess.run(prefix + [sys.executable, "-c", "import numpy, numba"],
                           capture_output=True, text=True, timeout=120, cwd="/")
    if probe.returncode != 0:
        return None, ("this Python environment is not readable by the unprivileged user "
                      f"(uid {NOBODY}): {probe.stderr.strip()[-300:]}")
    return prefix, None


@pytest.fixture
def sandbox():
    """A world-readable temp dir (pytest's tmp_path is private to root), removed afterwards."""
    root = tempfile.mkdtemp(prefix="fastbn-install-")
    os.chmod(root, 0o755)
    yield root
    subprocess.run(["chmod", "-R", "u+w", root], check=False)
    shutil.rmtree(root, ignore_errors=True)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "FASTBN_CACHE_DIR", "XDG_CACHE_HOME", "PYTHONPATH",
                        "FASTBN_BACKEND", "TMPDIR")}
    env.update(extra)
    return env


def _unprivileged_venv(sandbox, other_user=False):
    """Skips unless a child can run as an unprivileged user (``other_user``: as someone
    other than us, which needs root).  Returns (command prefix, python, package dir,
    an unwritable HOME) of a fresh venv under ``sandbox`` (see _fresh_venv)."""
    prefix, why = _drop_privileges()
    if prefix is None:
        pytest.skip(why)
    if other_user and not prefix:
        pytest.skip("needs root to make a directory owned by another user")
    python, pkg = _fresh_venv(sandbox)
    home = os.path.join(sandbox, "home")
    os.mkdir(home, 0o555)
    return prefix, python, pkg, home


def _check_results(got_file, expected):
    """The arrays saved in ``got_file`` (a path or a file object) equal ``expected``."""
    with np.load(got_file) as got:
        for k, v in expected.items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)


@numba_only
def test_read_only_install_and_unwritable_home(sandbox):
    """Fresh venv, package read-only, HOME unwritable, no cache variables: import and a
    first call work and give the right results; the kernels cache in a private
    directory under TMPDIR; nothing is written into the package; a second process
    loads the kernels from that cache."""
    prefix, python, pkg, home = _unprivileged_venv(sandbox)
    tmpdir = os.path.join(sandbox, "tmp")
    os.mkdir(tmpdir, 0o700)
    if prefix:
        os.chown(tmpdir, NOBODY, NOBODY)
    results = os.path.join(tmpdir, "r.npz")
    _read_only(os.path.join(sandbox, "venv"))
    files_before = _listing(pkg)
    env = _clean_env(HOME=home, TMPDIR=tmpdir)

    runs = []
    for _ in range(2):
        proc = subprocess.run(prefix + [python, "-c", _CHILD, results], env=env,
                              capture_output=True, text=True, timeout=300, cwd="/")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(_last_json(proc.stdout))
        _check_results(results, _expected())

    first, second = runs
    assert first["fastbn"] == pkg, "the child must import the read-only copy"
    assert first["backend"] == "numba"
    uid = os.geteuid() if not prefix else NOBODY
    assert first["cache_dir"] == os.path.join(tmpdir, f"fastbn-cache-{uid}")
    assert first["misses"] > 0 and second["misses"] == 0 and second["hits"] > 0, runs
    assert _listing(pkg) == files_before, "something was written into the installed package"


@numba_only
def test_foreign_temp_cache_dir_is_not_used(sandbox):
    """A per-user temp cache dir that another user created and others can write is
    refused (cached machine code from it would run here): no cache, same results."""
    prefix, python, _, home = _unprivileged_venv(sandbox, other_user=True)
    tmpdir = os.path.join(sandbox, "tmp")
    os.mkdir(tmpdir, 0o777)
    os.chmod(tmpdir, 0o1777)
    planted = os.path.join(tmpdir, f"fastbn-cache-{NOBODY}")
    os.mkdir(planted)
    os.chmod(planted, 0o777)  # owned by root, writable by anyone
    _read_only(os.path.join(sandbox, "venv"))
    results = os.path.join(sandbox, "out")
    os.mkdir(results)
    os.chown(results, NOBODY, NOBODY)
    proc = subprocess.run(prefix + [python, "-c", _CHILD, os.path.join(results, "r.npz"), "light"],
                          env=_clean_env(HOME=home, TMPDIR=tmpdir), capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = _last_json(proc.stdout)
    assert info["cache_dir"] != planted, "a cache dir owned by someone else was used"
    assert os.listdir(planted) == []
    _check_results(os.path.join(results, "r.npz"), _expected(light=True))


@numba_only
def test_no_writable_location_at_all(sandbox):
    """Package, HOME, /tmp and /var/tmp all read-only (read-only bind mounts in a private
    mount namespace): fastbn still imports and computes, compiling without a cache."""
    if os.geteuid() != 0 or UNSHARE is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    probe = subprocess.run([UNSHARE, "-m", "sh", "-c", "mount --bind -o ro / /mnt"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not allowed here: {probe.stderr.strip()[-200:]}")
    # root could still write to "/" (tempfile's last resort): needs an unprivileged user
    prefix, python, _, home = _unprivileged_venv(sandbox)
    _read_only(os.path.join(sandbox, "venv"))
    # results leave through a pipe (stdout), since no file can be written
    child = _CHILD + textwrap.dedent("""
        import io, base64
        buf = io.BytesIO()
        np.savez(buf, **res)
        print(base64.b64encode(buf.getvalue()).decode())
        print(json.dumps(dict(cache_dir=_jit.cache_dir(), backend=fbn.backend_for(x))))
    """)
    script_path = os.path.join(sandbox, "child.py")
    with open(script_path, "w") as f:
        f.write(child)
    ro = " && ".join(f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"
                     for d in ("/tmp", "/var/tmp") if os.path.isdir(d))
    cmd = " ".join(prefix + [python, script_path, "-", "light"])
    proc = subprocess.run([UNSHARE, "-m", "sh", "-c", f"{ro} && cd / && exec {cmd}"],
                          env=_clean_env(HOME=home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    info = _last_json(proc.stdout)
    assert info["cache_dir"] is None and info["backend"] == "numba", info
    _check_results(io.BytesIO(base64.b64decode(lines[-2])), _expected(light=True))


_RACER = textwrap.dedent("""
    import os, sys, time
    go = os.environ["FASTBN_TEST_GO"]
    while not os.path.exists(go):  # start compiling at the same moment as the other racer
        time.sleep(0.001)
""") + _CHILD


@numba_only
def test_two_processes_compiling_into_one_cache(sandbox):
    """Two processes compile into the same fresh FASTBN_CACHE_DIR at once: both correct;
    a third loads every kernel from the cache (no compilation) and is correct too."""
    cache = os.path.join(sandbox, "cache")
    go = os.path.join(sandbox, "go")
    env = _clean_env(FASTBN_CACHE_DIR=cache, FASTBN_TEST_GO=go)
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, os.path.join(sandbox, f"r{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd="/") for i in range(2)]
    time.sleep(1.0)  # both imported fastbn and numba and wait at the line
    open(go, "w").close()
    infos = []
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        infos.append(_last_json(out))
        _check_results(os.path.join(sandbox, f"r{i}.npz"), _expected())
    assert all(info["cache_dir"] == cache and info["misses"] > 0 for info in infos), infos
    assert any(f.endswith(".nbi") for _, _, fs in os.walk(cache) for f in fs)

    proc = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(sandbox, "r3.npz")], env=env,
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    third = _last_json(proc.stdout)
    _check_results(os.path.join(sandbox, "r3.npz"), _expected())
    assert third["misses"] == 0 and third["hits"] > 0, third


# -- a source checkout, the per-ISA Cython builds, a failed build -------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc", "*.c", "*.html", "*.so",
                                 "_cython_build_failed.txt")
_WHERE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastbn, fastbn.kernels, fastbn.__main__
    import fastbn._source_tree as st
    x = np.random.default_rng(3).standard_normal((6, 3, 5, 7)).astype(np.float32) + 5
    y, m, inv = fastbn.batch_norm_train(x)
    print(json.dumps(dict(fastbn=fastbn.__file__, kernels=fastbn.kernels.__file__,
                          main=fastbn.__main__.__file__, mode=getattr(st, "MODE", None),
                          mean=m.tolist(), n=len([k for k in sys.modules if k.startswith("fastbn")]))))
""")


def _checkout(dst):
    """A copy of this checkout's fastbn/ and kernels/ (sources only) at dst; None if the
    tests do not lie in a checkout (no ./fastbn beside tests/)."""
    if not os.path.isfile(os.path.join(ROOT, "fastbn", "__init__.py")):
        return None
    for d in ("fastbn", "kernels"):
        shutil.copytree(os.path.join(ROOT, d), os.path.join(dst, d), ignore=_IGNORE)
    return dst


def _deps_only(root):
    """A folder of links to this environment's packages, fastbn left out (and any
    editable-install hook): a child whose sys.path has it can import numpy and numba
    but not fastbn."""
    deps = os.path.join(root, "deps")
    os.mkdir(deps)
    for base in {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
                 os.path.dirname(os.path.dirname(np.__file__))}:
        for name in os.listdir(base):
            low = name.lower()
            if low.startswith(("fastbn", "__editable__")) or low.endswith(".pth") \
                    or os.path.exists(os.path.join(deps, name)):
                continue
            os.symlink(os.path.join(base, name), os.path.join(deps, name))
    return deps


def test_checkout_root_imports_the_installed_package(sandbox):
    """Python started in a checkout's root (./fastbn first on sys.path, without
    fastbn/kernels) gets the installed fastbn, submodules and `-m fastbn` too."""
    python, pkg = _fresh_venv(sandbox)
    co = _checkout(os.path.join(sandbox, "checkout"))
    if co is None:
        pytest.skip("the tests do not lie in a checkout")
    proc = subprocess.run([python, "-c", _WHERE], capture_output=True, text=True, timeout=300,
                          cwd=co, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = _last_json(proc.stdout)
    assert os.path.dirname(info["fastbn"]) == pkg, info
    assert os.path.dirname(info["kernels"]) == os.path.join(pkg, "kernels"), info
    assert os.path.dirname(info["main"]) == pkg, info
    np.testing.assert_allclose(info["mean"], 5 + np.zeros(3), atol=1.0)


def test_bare_checkout_maps_its_kernels(sandbox):
    """No fastbn installed anywhere: the checkout runs as it is, ./kernels serving as
    fastbn.kernels; results equal this process's."""
    co = _checkout(os.path.join(sandbox, "checkout"))
    if co is None:
        pytest.skip("the tests do not lie in a checkout")
    env = _clean_env(PYTHONPATH=_deps_only(sandbox), FASTBN_CACHE="0")
    proc = subprocess.run([sys.executable, "-S", "-c", _WHERE], capture_output=True, text=True,
                          timeout=300, cwd=co, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = _last_json(proc.stdout)
    assert info["mode"] == "source", info
    assert info["fastbn"] == os.path.join(co, "fastbn", "__init__.py"), info
    assert info["kernels"] == os.path.join(co, "kernels", "__init__.py"), info
    x = np.random.default_rng(3).standard_normal((6, 3, 5, 7)).astype(np.float32) + 5
    np.testing.assert_array_equal(info["mean"], fastbn.batch_norm_train(x)[1].tolist())


_VARIANT = textwrap.dedent("""
    import io, base64, sys
    import numpy as np
    import fastbn
    from fastbn.kernels import _isa
    rng = np.random.default_rng(11)
    res = {}
    for shape, ax in [((5, 7, 33, 9), 1), ((301, 19), 1), ((4, 6, 5, 40), -1)]:
        x = (rng.standard_normal(shape) * 3 + 1e4).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        s = rng.standard_normal(shape[ax]).astype(np.float32)
        y, m, inv = fastbn.batch_norm_train(x, s, s, channel_axis=ax, backend="cython")
        dx, ds, do = fastbn.batch_norm_backward(dy, x, s, m, inv, channel_axis=ax, backend="cython")
        for k, v in dict(y=y, m=m, inv=inv, dx=dx, ds=ds, do=do).items():
            res[f"{shape}-{k}"] = v
    buf = io.BytesIO()
    np.savez(buf, **res)
    print(_isa.CHOSEN)
    print(base64.b64encode(buf.getvalue()).decode())
""")


def test_every_cython_build_this_cpu_runs_agrees():
    """Each per-ISA build of the extension that is installed and that this CPU can
    run (FASTBN_CYTHON_ISA forces it) gives the portable build's results to an ulp or
    two; forcing one this CPU lacks, or an unknown one, is refused with the reason."""
    import base64
    import io
    from fastbn.kernels import _isa
    try:
        _isa.cython_kernels  # noqa: B018
    except ImportError as exc:
        pytest.skip(f"Cython backend not built: {exc}")
    import importlib.machinery
    base_file = importlib.machinery.PathFinder.find_spec(_isa.NAME, fastbn.kernels.__path__).origin
    built = [v for v in _isa.supported() if _isa._file(v, base_file)]
    results = {}
    for variant in built:
        proc = subprocess.run([sys.executable, "-c", _VARIANT], capture_output=True, text=True,
                              timeout=300, env=_clean_env(FASTBN_CYTHON_ISA=variant))
        assert proc.returncode == 0, (variant, proc.stderr[-3000:])
        chosen, blob = proc.stdout.split()[-2:]
        assert chosen == variant
        with np.load(io.BytesIO(base64.b64decode(blob))) as f:
            results[variant] = {k: f[k] for k in f.files}
    assert "baseline" in results
    for variant, res in results.items():
        for k, v in res.items():
            np.testing.assert_allclose(v, results["baseline"][k], rtol=2e-6, atol=1e-6,
                                       err_msg=f"{variant} {k}")
    lacking = [v for v, _ in _isa.VARIANTS if v not in _isa.supported()]
    for bad in lacking[:1] + ["pentium"]:
        proc = subprocess.run([sys.executable, "-c", "import fastbn; print(fastbn.backends()['cython'])"],
                              capture_output=True, text=True, timeout=300,
                              env=_clean_env(FASTBN_CYTHON_ISA=bad))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "FASTBN_CYTHON_ISA" in proc.stdout and bad in proc.stdout, proc.stdout


def test_failed_build_is_reported_once(sandbox):
    """An install whose Cython build failed (setup.py's note, no extension): backends()
    names the reason and a RuntimeWarning says so once per process; fastbn still works."""
    python, pkg = _fresh_venv(sandbox)
    kern = os.path.join(pkg, "kernels")
    for name in os.listdir(kern):
        if name.startswith("_cython_kernels") and not name.endswith(".py"):
            os.remove(os.path.join(kern, name))
    with open(os.path.join(kern, "_cython_build_failed.txt"), "w") as f:
        f.write("the build failed when fastbn was installed (CompileError: gcc: not found)\n")
    child = textwrap.dedent("""
        import warnings, numpy as np
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastbn
            r1 = fastbn.backends()["cython"]
            r2 = fastbn.backends()["cython"]
            fastbn.batch_norm_train(np.ones((3, 2, 4)) + np.arange(4))
        print(len([w for w in caught if issubclass(w.category, RuntimeWarning)
                   and "Cython" in str(w.message)]))
        print(r1 == r2, r1)
    """)
    proc = subprocess.run([python, "-c", child], capture_output=True, text=True, timeout=300,
                          cwd="/", env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, same = proc.stdout.strip().splitlines()[-2:]
    assert count == "1", proc.stdout
    assert same.startswith("True") and "gcc: not found" in same, same
