"""Importers for features people already have: MMIN's released h5 files (``mmin``) and MMSA's
processed pickles (``mmsa``). Each writes imer feature stores, a manifest, fold files and the
dataset's ``features.json`` (modality -> store), so those users train without raw media;
:func:`open_imported` opens those stores for training."""

from manifests.importers._stores import open_imported

__all__ = ["open_imported"]
