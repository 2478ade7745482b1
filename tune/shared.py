"""The feature matrices in Ray's object store: one copy a node, read by the driver and its trials.

`tune.with_parameters` puts what trials need into the object store, and the driver writes that
copy itself, so the store's pages count in the driver's memory as well as its own copy, which
finalize reads later: two copies of the largest thing a job holds (0.95 GB each at 10^6
molecules). `share_matrices` puts the fingerprint and descriptor matrices once, and the driver
goes on with read-only views of that copy (`ray.get` of numpy arrays is zero-copy), dropping its
own. Trials receive the matrices' object reference, not the arrays (`TrialData.matrices`): a
reference inside the parameters is borrowed by each trial, whose `ray.get` maps the same pages.
The copy lives while the driver's views or references to it do.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from toxmodel.featurize import Features
from tune import heap

if TYPE_CHECKING:  # trials import this module; they need not import the driver's stages
    from tune.prepare import PreparedData


def share_matrices(data: PreparedData) -> PreparedData:
    """`data` with its matrices moved into Ray's object store (Ray must be started): the
    returned features read that copy in place (read-only) and `data.matrices` refers to it.
    Already shared: returned as it is."""
    if data.matrices is not None:
        return data
    features = data.features
    heap.trim()  # the put holds a second copy for a moment: no freed pages beside both
    ref = ray.put((features.fingerprint, features.descriptors))
    fingerprint, descriptors = ray.get(ref)
    shared = replace(features, fingerprint=fingerprint, descriptors=descriptors)
    return replace(data, features=shared, matrices=ref)


def without_matrices(features: Features) -> Features:
    """`features` with zero-row matrices of the same widths and types: what travels beside the
    reference, so the arrays are not pickled into a second copy."""
    return replace(
        features,
        fingerprint=np.empty((0, features.fingerprint.shape[1]), features.fingerprint.dtype),
        descriptors=np.empty((0, features.descriptors.shape[1]), features.descriptors.dtype),
    )


def with_matrices(features: Features, matrices: Any) -> Features:
    """`features` with the shared matrices `matrices` refers to (a zero-copy `ray.get`)."""
    fingerprint, descriptors = ray.get(matrices)
    return replace(features, fingerprint=fingerprint, descriptors=descriptors)
