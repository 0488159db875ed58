"""med3dvlm: 3D medical vision-language models (Med3DVLM, MedMAP) for CT and MRI.

    >>> import med3dvlm
    >>> pipe = med3dvlm.load("demo")
    >>> pipe.report("resources/samples/ct_phantom.nii.gz")
    >>> remote = med3dvlm.connect("http://gpu-box:8000", token="...")  # the same methods, on a server

Heavy modules (torch, transformers) load on first use of ``load``.
"""

from ._version import __version__
from .cancel import CancelToken
from .errors import Med3DVLMError, ModelError, RegionError, VolumeError
from .volume import Volume

__all__ = ["__version__", "CancelToken", "Med3DVLMError", "ModelError", "RegionError", "Volume", "VolumeError",
           "connect", "load", "read_volume"]


def load(model="demo", device="auto", dtype="auto", **kwargs):
    """Load a model folder (or the bundled ``"demo"``) into a :class:`~med3dvlm.pipeline.Pipeline`."""
    from .pipeline import load as _load

    return _load(model, device=device, dtype=dtype, **kwargs)


def connect(url, token=None, ca_file=None):
    """A client of a ``med3dvlm serve`` model server with the pipeline's methods (report, ask,
    stream_ask, detect, retrieve); ``token`` defaults to $MED3DVLM_TOKEN."""
    from .client.remote import connect as _connect

    return _connect(url, token, ca_file)


def read_volume(path, **kwargs) -> Volume:
    """Read a NIfTI, NRRD or DICOM-series volume (see :func:`med3dvlm.readers.read_volume`)."""
    from .readers import read_volume as _read

    return _read(path, **kwargs)
