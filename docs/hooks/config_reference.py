"""MkDocs hook: add docs/configuration.md, rendered from tinylm/config.py, to every build.

The page exists only in the built site (there is no file to forget to regenerate):
`tinylm.config_reference.reference_markdown()` renders it from the config dataclasses.
"""

import sys
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # build from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from tinylm.config_reference import reference_markdown  # noqa: E402

PAGE = "configuration.md"


def on_files(files, config):
    if files.get_file_from_path(PAGE) is not None:
        raise PluginError(f"docs/{PAGE} is generated from tinylm/config.py at build time: delete the file")
    files.append(File.generated(config, PAGE, content=reference_markdown()))
    return files
