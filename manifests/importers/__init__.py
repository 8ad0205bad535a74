"""Importers for features people already have: MMIN's released h5 files (``mmin``) and MMSA's
processed pickles (``mmsa``). Each writes imer feature stores, a manifest, fold files and the
dataset's ``features.json`` (modality -> store), so those users train without raw media."""
