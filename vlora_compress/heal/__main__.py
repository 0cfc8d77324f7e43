"""``python -m vlora_compress.heal ...`` (what torchrun launches): the heal command alone.

An entry module of its own, so that no module of the package imports the command line back.
"""

from ..cli.app import heal_main

heal_main()
