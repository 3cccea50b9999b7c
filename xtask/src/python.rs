//! The Python client's checks (`chaos-agent/python`), run by `cargo xtask test` with the unit tier and by
//! `cargo xtask python-check`: `ruff check`, `ruff format --check`, `mypy --strict` (the settings are in its
//! `pyproject.toml`) and its pytest suite, which without the zk tier's setup runs the tests that need no agent
//! (codec, RPC peer, routing, version, plugin) and skips the others.
//!
//! The tools come from the package's own extras (`[test]`: pytest, `[lint]`: pinned mypy, ruff, stubs), installed
//! with the package into `target/python-check-venv` (rebuilt when `pyproject.toml` or the interpreter change, else
//! only the package is reinstalled), plus msgpack as the codec tests' reference. Nothing is written into the source
//! tree: pip builds from a copy, and the caches of mypy and ruff live in the venv.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use chaos_test_support::fnv1a64;

use crate::util::{self, step};

/// Debian's interpreter; never pyenv's (which may come first on PATH).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// The codec tests compare the client's pure-Python msgpack with this one (not a dependency of the client).
const REFERENCE_MSGPACK: &str = "msgpack==1.2.4";
const STAMP_FILE: &str = ".lymph-chaos-python-check-stamp";

/// `chaos-agent/python`.
fn client_dir() -> PathBuf {
    util::root().join("chaos-agent").join("python")
}

fn venv_dir() -> PathBuf {
    util::target_dir().join("python-check-venv")
}

/// Makes sure the check venv is ready (network needed on its first build). Kept apart from [`check`] so that
/// `cargo xtask test` can report a missing venv as a skipped check, like a tier that cannot run.
///
/// # Errors
/// `python3 -m venv` or pip fails.
pub fn prepare() -> Result<PathBuf> {
    let venv = venv_dir();
    let version = util::output(Command::new(SYSTEM_PYTHON).arg("--version"))
        .with_context(|| format!("{SYSTEM_PYTHON} --version failed (Debian package python3-venv)"))?;
    let pyproject =
        fs::read(client_dir().join("pyproject.toml")).context("reading chaos-agent/python/pyproject.toml")?;
    let stamp = format!("{}pyproject.toml: {:016x}\n{REFERENCE_MSGPACK}\n", version, fnv1a64(&pyproject));
    let package = package_copy()?;
    let package = package.to_str().context("non-UTF-8 target directory")?;
    let stamp_path = venv.join(STAMP_FILE);
    if fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && venv.join("bin").join("python").is_file() {
        // Same requirements: only the package itself, as it is now.
        pip(&venv, &["--no-deps", "--force-reinstall", package])?;
        return Ok(venv);
    }
    step(format!("building the Python check venv in {}", venv.display()));
    let started = Instant::now();
    if venv.exists() {
        if !venv.join("pyvenv.cfg").is_file() {
            bail!("{} exists and is not a venv; not removing it", venv.display());
        }
        fs::remove_dir_all(&venv).with_context(|| format!("removing the stale venv {}", venv.display()))?;
    }
    util::run(Command::new(SYSTEM_PYTHON).args(["-m", "venv"]).arg(&venv).env_remove("PYTHONHOME"))?;
    pip(&venv, &[&format!("{package}[test,lint]"), REFERENCE_MSGPACK])?;
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    eprintln!("    Python check venv ready after {:.1?}", started.elapsed());
    Ok(venv)
}

/// Runs ruff, mypy and pytest from `venv` over the client; fails on the first that fails.
///
/// # Errors
/// A check failed (its output is above), or a tool could not start.
pub fn check(venv: &Path) -> Result<()> {
    let dir = client_dir();
    let bin = venv.join("bin");
    let tool = |program: &str| -> Command {
        let mut cmd = Command::new(bin.join(program));
        cmd.current_dir(&dir)
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("RUFF_CACHE_DIR", venv.join("ruff-cache"))
            .env("MYPY_CACHE_DIR", venv.join("mypy-cache"));
        cmd
    };
    step("Python client: ruff check, ruff format --check, mypy --strict");
    util::run(tool("ruff").args(["check", "src", "tests"]))?;
    util::run(tool("ruff").args(["format", "--check", "src", "tests"]))?;
    util::run(&mut tool("mypy"))?;
    step("Python client: pytest (the tests that need no agent; the zk tier runs the rest)");
    let work = venv.join("pytest-work");
    fs::create_dir_all(&work)?;
    // From outside the source tree, so that the package is the installed one.
    util::run(
        tool("python")
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(dir.join("tests"))
            .current_dir(&work)
            .env_remove("LYMPH_CONFIG")
            .env_remove("CHAOS_PY_REQUIRE_ALL"),
    )
}

/// `cargo xtask python-check`.
///
/// # Errors
/// As [`prepare`] and [`check`].
pub fn run() -> Result<()> {
    let venv = prepare()?;
    check(&venv)
}

/// `<venv>/bin/pip install <args>` (quiet, no version check).
fn pip(venv: &Path, args: &[&str]) -> Result<()> {
    util::run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--no-input", "--disable-pip-version-check"])
            .args(args)
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env_remove("PIP_REQUIRE_VIRTUALENV")
            .env("PIP_DEFAULT_TIMEOUT", std::env::var("PIP_DEFAULT_TIMEOUT").unwrap_or_else(|_| "120".into())),
    )
}

/// A fresh copy of the package without its tests (`target/python-check-package`): pip builds in the directory it
/// is given, and must not leave `build/` or `*.egg-info` in the source tree.
fn package_copy() -> Result<PathBuf> {
    let to = util::target_dir().join("python-check-package");
    match fs::remove_dir_all(&to) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", to.display())),
    }
    copy_tree(&client_dir(), &to)?;
    Ok(to)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if matches!(name.as_ref(), "tests" | "build" | "dist" | "__pycache__" | ".pytest_cache" | ".mypy_cache")
            || name.ends_with(".egg-info")
        {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}
