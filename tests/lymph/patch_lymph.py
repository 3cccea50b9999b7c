"""Make PyPI's lymph 0.15.0 (2016) run on CPython 3.11.

Run it with the venv's interpreter after `pip install --no-deps lymph==0.15.0`:

    $VENV/bin/python tests/lymph/patch_lymph.py

It edits only that venv's site-packages. Every patch is idempotent: a file that already
holds the patched text is left alone, a file that holds neither the original nor the
patched text makes the script fail loudly (a different lymph, or a changed patch). The
five patches, each what CPython 3.11, PyYAML 6 or gevent >= 1.5 removed or renamed:

1. lymph/core/decorators.py: collections.Callable -> collections.abc.Callable;
   inspect.getargspec/ArgSpec (removed in 3.11) -> a local shim on getfullargspec.
2. lymph/config.py: collections.Mapping -> collections.abc.Mapping;
   yaml.load(f) -> yaml.load(f, Loader=yaml.FullLoader) (PyYAML 6 needs a Loader).
3. lymph/cli/service.py: gevent.signal(...) -> gevent.signal_handler(...) (renamed in gevent 1.5).
4. lymph's metadata: the requirement gevent==1.1b5 -> gevent, because pkg_resources checks it
   when lymph's CLI loads its `lymph.cli` entry points (METADATA in a .dist-info, or
   requires.txt in an .egg-info: which one pip writes depends on pip/setuptools/wheel).
5. a .pth file putting the collections.<ABC> aliases back (cli/tail.py and friends use
   collections.Iterator & co. at import time).

At the end it imports the patched modules and resolves lymph's requirements through
pkg_resources, so a patch that "applied" but does not work fails here, not in a test.
"""

import glob
import importlib.util
import os
import sys

EXPECTED_VERSION = "0.15.0"

DECORATORS_SHIM = '''

# lymph-chaos patch: inspect.getargspec/ArgSpec were removed in Python 3.11.
_ArgSpec = collections.namedtuple('ArgSpec', 'args varargs keywords defaults')


def _getargspec(func):
    spec = inspect.getfullargspec(func)
    return _ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)
'''

# (relative path inside the lymph package, [(original, patched), ...])
SOURCE_PATCHES = [
    (
        "core/decorators.py",
        [
            ("import collections\n", "import collections\nimport collections.abc\n"),
            ("from lymph.core.declarations import Declaration\n",
             "from lymph.core.declarations import Declaration\n" + DECORATORS_SHIM),
            ("class RPCBase(collections.Callable):", "class RPCBase(collections.abc.Callable):"),
            ("spec = inspect.getargspec(self._func)", "spec = _getargspec(self._func)"),
            ("return inspect.ArgSpec(spec.args[1:], *spec[1:])",
             "return _ArgSpec(spec.args[1:], *spec[1:])"),
        ],
    ),
    (
        "config.py",
        [
            ("import collections\n", "import collections\nimport collections.abc\n"),
            ("class ConfigObject(collections.Mapping):", "class ConfigObject(collections.abc.Mapping):"),
            ("yaml.load(f)", "yaml.load(f, Loader=yaml.FullLoader)"),
        ],
    ),
    (
        "cli/service.py",
        [
            ("gevent.signal(signal.", "gevent.signal_handler(signal."),
        ],
    ),
]

PTH_NAME = "lymph_chaos_collections_compat.pth"
PTH_LINE = (
    "import collections; list(map(lambda n, c=__import__('collections'), "
    "a=__import__('collections.abc').abc: hasattr(c, n) or setattr(c, n, getattr(a, n)), "
    "__import__('collections.abc').abc.__all__))\n"
)

# (glob inside site-packages, original, patched)
METADATA_PATCHES = [
    ("lymph-%s.dist-info/METADATA" % EXPECTED_VERSION, "Requires-Dist: gevent==1.1b5\n", "Requires-Dist: gevent\n"),
    ("lymph-%s.egg-info/requires.txt" % EXPECTED_VERSION, "gevent==1.1b5\n", "gevent\n"),
    ("lymph-%s-*.egg-info/requires.txt" % EXPECTED_VERSION, "gevent==1.1b5\n", "gevent\n"),
]


class PatchError(Exception):
    pass


def patch_text(path, text, original, patched):
    """Applies one replacement to `text`; returns the new text (unchanged when already applied)."""
    # "Already applied" must be checked first: some patched texts contain the original
    # (e.g. "import collections\n" is a prefix of its patched form).
    if patched in text:
        return text
    count = text.count(original)
    if count == 0:
        raise PatchError("%s: neither the original %r nor the patched %r is there" % (path, original, patched))
    return text.replace(original, patched)


def patch_file(path, replacements):
    with open(path, encoding="utf-8") as f:
        before = f.read()
    after = before
    for original, patched in replacements:
        after = patch_text(path, after, original, patched)
    if after != before:
        with open(path, "w", encoding="utf-8") as f:
            f.write(after)
        # Stale bytecode would be rebuilt from the new mtime anyway; drop it to be explicit.
        for pyc in glob.glob(os.path.join(os.path.dirname(path), "__pycache__",
                                          os.path.splitext(os.path.basename(path))[0] + ".*.pyc")):
            os.remove(pyc)
        print("patched   %s" % path)
    else:
        print("unchanged %s" % path)


def lymph_package_dir():
    # find_spec does not execute lymph/__init__.py (which would fail before the patches).
    spec = importlib.util.find_spec("lymph")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("lymph is not installed in %s" % sys.prefix)
    for location in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(location, "core", "decorators.py")):
            return location
    raise PatchError("no lymph/core/decorators.py under %s" % list(spec.submodule_search_locations))


def main():
    if sys.prefix == sys.base_prefix:
        raise PatchError("run this with a virtualenv's python (it patches site-packages), not %s" % sys.executable)
    package = lymph_package_dir()
    site_packages = os.path.dirname(package)

    # 4 first: checks the installed version before touching any source.
    patched_metadata = False
    for pattern, original, patched in METADATA_PATCHES:
        for path in glob.glob(os.path.join(site_packages, pattern)):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if original not in text and patched not in text:
                raise PatchError("%s: no gevent requirement to relax" % path)
            patch_file(path, [(original, patched)])
            patched_metadata = True
    if not patched_metadata:
        raise PatchError("no lymph-%s metadata (.dist-info or .egg-info) in %s" % (EXPECTED_VERSION, site_packages))

    for relative, replacements in SOURCE_PATCHES:
        patch_file(os.path.join(package, relative), replacements)

    pth = os.path.join(site_packages, PTH_NAME)
    if not (os.path.isfile(pth) and open(pth, encoding="utf-8").read() == PTH_LINE):
        with open(pth, "w", encoding="utf-8") as f:
            f.write(PTH_LINE)
        print("wrote     %s" % pth)
    else:
        print("unchanged %s" % pth)

    verify()


def verify():
    """Imports what the CLI imports and resolves lymph's requirements like pkg_resources does."""
    import collections
    import io
    import warnings

    # The .pth only runs at interpreter start; apply the same aliases here for the checks below.
    exec(PTH_LINE, {})
    # What `lymph` (cli/main.py) does first: gevent.monkey.patch_all() and exporting
    # lymph.Interface, lymph.rpc, lymph.__version__ … (lymph is a namespace package without
    # an __init__.py when pip installs it with `setup.py install`).
    import lymph.monkey

    lymph.monkey.patch()
    import lymph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "pkg_resources is deprecated"
        import pkg_resources

        pkg_resources.require("lymph==%s" % EXPECTED_VERSION)
    import lymph.cli.base  # noqa: F401  (the entry-point loader)
    import lymph.cli.service  # noqa: F401
    import lymph.cli.tail  # noqa: F401  (needs the collections aliases)
    import lymph.config

    if lymph.__version__ != EXPECTED_VERSION:
        raise PatchError("lymph %s installed, expected %s" % (lymph.__version__, EXPECTED_VERSION))
    if not hasattr(collections, "Iterator"):
        raise PatchError("collections.Iterator alias missing")
    config = lymph.config.Configuration()
    config.load(io.StringIO("container:\n    ip: 127.0.0.1\n"))
    if config.get("container.ip") != "127.0.0.1":
        raise PatchError("lymph.config.Config could not load YAML")

    class Probe(lymph.Interface):
        @lymph.rpc()
        def echo(self, text, upper=False):
            return text

    if list(Probe.echo.args.args) != ["text", "upper"]:
        raise PatchError("rpc argument spec is wrong: %r" % (Probe.echo.args,))
    print("lymph %s patched and importable on Python %s" % (lymph.__version__, sys.version.split()[0]))


if __name__ == "__main__":
    try:
        main()
    except PatchError as err:
        print("patch_lymph.py: error: %s" % err, file=sys.stderr)
        sys.exit(1)
