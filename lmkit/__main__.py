from lmkit.cli import entry

entry()
