"""Dataset converters: raw download layout -> meta.json records, one module per dataset.

``CONVERTERS`` maps each dataset name to its :class:`~zsadcli.data.converters.base.Converter`;
importing this package registers them all, in the order `zsad prepare --list` shows them.
"""
from zsadcli.data.converters.base import (CONVERTERS, ConversionResult, Converter, LayoutNotFound, Problem,
                                          register)
# isort: off
from zsadcli.data.converters import (mvtec, visa, mpdd, btad, sdd, dagm, dtd, headct, brainmri, br35h,  # noqa: F401
                                     isic, clinicdb, colondb, kvasir, endo, tn3k, covid, synthetic, folder)
# isort: on

__all__ = ["CONVERTERS", "ConversionResult", "Converter", "LayoutNotFound", "Problem", "register"]
