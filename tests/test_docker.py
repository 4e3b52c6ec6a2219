"""The worker image (Dockerfile) can't be built here (no Docker engine): check that
it installs pinned dependencies, and installs them before it copies the code."""

from __future__ import annotations

import re
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = "deploy/constraints.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The image's Python, for dependencies that depend on it.
IMAGE_PYTHON = "3.12"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), " ".join(rest.split())))
    return found


def pins() -> dict[str, str]:
    """Package name to the version the constraints file pins."""
    pinned = {}
    for line in (ROOT / CONSTRAINTS).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[\w.+!-]+", version.strip()), f"not pinned: {line!r}"
        pinned[canonicalize_name(name.strip())] = version.strip()
    return pinned


def image_environment(extra: str = "") -> dict[str, str]:
    env = dict(default_environment())
    env.update(python_version=IMAGE_PYTHON, python_full_version=f"{IMAGE_PYTHON}.8")
    env.update(sys_platform="linux", platform_system="Linux", os_name="posix", extra=extra)
    return env


def runtime_requirements() -> list[Requirement]:
    """What the image installs: QWIT's dependencies and its tracing and postgres extras'."""
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [
        Requirement(r) for r in [*project["dependencies"], *extras["tracing"], *extras["postgres"]]
    ]


def test_every_runtime_dependency_is_pinned_at_a_version_pyproject_allows():
    pinned = pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in {CONSTRAINTS}"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{CONSTRAINTS} pins {name}=={pinned[name]}, which {requirement} excludes"
        )


def test_the_pins_are_closed_under_their_own_requirements():
    """Every requirement of a pinned package, as the image's Python sees it, is pinned too.

    Read from the installed packages' metadata, for those installed here at
    the pinned version (the development environment should match the pins).
    """
    pinned = pins()
    todo = [(r, frozenset(r.extras)) for r in runtime_requirements()]
    checked = set()
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} (needed by the image) is not pinned"
        if (name, extras) in checked:
            continue
        checked.add((name, extras))
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if canonicalize_name(dist.version) != canonicalize_name(pinned[name]):
            continue
        for text in dist.requires or []:
            needed = Requirement(text)
            envs = [image_environment(e) for e in (extras or {""})]
            if needed.marker is None or any(needed.marker.evaluate(env) for env in envs):
                todo.append((needed, frozenset(needed.extras)))
    assert {name for name, _ in checked} == set(pinned), "pins that nothing needs"


def test_dockerfile_installs_the_pins_before_it_copies_the_code():
    steps = instructions()

    def first(among: list[int], test: Callable[[str], object], what: str) -> int:
        found = [i for i in among if test(steps[i][1])]
        assert found, f"the Dockerfile has no {what}"
        return found[0]

    copies = [i for i, (kw, args) in enumerate(steps) if kw == "COPY"]
    installs = [i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "pip install" in args]
    local = re.compile(r"pip install --no-deps \.(\s|$)")
    copy_constraints = first(copies, lambda args: args.split()[0] == CONSTRAINTS, "COPY pins")
    install_pins = first(installs, lambda args: f"-r {CONSTRAINTS}" in args, "install pins")
    copy_code = first(copies, lambda args: args.split()[0] == "qwit", "COPY qwit")
    install_code = first(installs, local.search, "pip install --no-deps .")
    assert copy_constraints < install_pins < copy_code < install_code
    # nothing but the constraints file is in the context before the pins are installed
    assert [steps[i][1].split()[0] for i in copies if i < install_pins] == [CONSTRAINTS]
    # no install pulls an unpinned dependency
    for i in installs:
        assert "--no-deps" in steps[i][1], steps[i][1]
    assert "pip check" in steps[install_code][1]


def test_the_image_python_is_the_one_the_pins_are_for():
    base = next(args for kw, args in instructions() if kw == "FROM")
    assert base.startswith(f"python:{IMAGE_PYTHON}.")
