"""One-time setup that lets webui load a LLaVA checkpoint given with ``--model`` on the command line.

webui loads ``--model`` before it imports any extension, through ``AutoModelForCausalLM``, which refuses
LLaVA configs. The extension registers a text-only LLaVA loader in ``setup()``, which covers models
loaded from the Model tab or the API; for ``--model`` the registration has to happen earlier. Running

    python extensions/llava/llava_autoload.py install
    python user_data/extensions/llava/llava_autoload.py install   (the other install location)

once with webui's Python (``cmd_linux.sh`` / ``cmd_windows.bat`` / ``cmd_macos.sh`` opens a shell in its
environment) writes ``llava_webui_autoload.pth`` into that environment's site-packages. Python runs its
one line at start-up; it does nothing unless the program is webui's ``server.py``, and then only adds a
hook that registers the loader right after ``transformers`` is imported. ``uninstall`` removes it.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import logging
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "llava_webui_autoload.pth"
EXTENSION_DIR = Path(__file__).resolve().parent
logger = logging.getLogger(__name__)


def pth_line(extension_dir: Path = EXTENSION_DIR) -> str:
    """The .pth line: cheap for every other program (one string comparison)."""
    return (
        "import sys; exec("
        + repr(
            "if sys.argv and sys.argv[0].replace('\\\\', '/').endswith('server.py'):\n"
            f"    sys.path.insert(0, {str(extension_dir)!r})\n"
            "    import llava_autoload\n"
            "    llava_autoload.activate()\n"
        )
        + ")\n"
    )


def default_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def install(site_packages: Path | None = None) -> Path:
    target = Path(site_packages or default_site_packages()) / PTH_NAME
    target.write_text(pth_line(), encoding="utf-8")
    return target


def uninstall(site_packages: Path | None = None) -> bool:
    target = Path(site_packages or default_site_packages()) / PTH_NAME
    if target.exists():
        target.unlink()
        return True
    return False


def activate() -> None:
    """Register the LLaVA loader as soon as ``transformers`` has been imported (or now, if it has)."""
    if "transformers" in sys.modules:
        _register()
        return
    if not any(isinstance(finder, _AfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())


def _register() -> None:
    try:
        import llava_checkpoint

        llava_checkpoint.register_with_transformers()
    except Exception:  # noqa: BLE001 - never break the program that is starting
        logger.exception("llava: could not register the LLaVA loader with transformers")


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers`` is first imported it wraps that module's loader so
    that the registration runs right after the module has executed, then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "uninstall", "status"])
    parser.add_argument("--site-packages", type=Path, default=None, help="default: this Python's site-packages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    site = args.site_packages or default_site_packages()
    if args.action == "install":
        logger.info("installed %s (webui's server.py will register the LLaVA loader at start-up)", install(site))
    elif args.action == "uninstall":
        logger.info("removed %s" if uninstall(site) else "nothing to remove in %s", site / PTH_NAME)
    else:
        logger.info("%s: %s", site / PTH_NAME, "installed" if (site / PTH_NAME).exists() else "not installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
