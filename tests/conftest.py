"""Shared test setup: Qt runs offscreen, the Slicer module's code is importable, and a small
CT phantom dataset in the M3D layouts is written once per session (tests only read it)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from med3dvlm.data.m3d import write_dataset

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before anything imports Qt

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "SlicerMed3DVLM",):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def ct_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-dataset")
    write_dataset(root, 8, seed=4242, modality="CT", splits=(1.0, 0.0, 0.0), progress=False)
    return root


@pytest.fixture
def scene():
    from slicer import vtkMRMLScene

    return vtkMRMLScene()


@pytest.fixture
def slicer_scene():
    """make() -> a vtkMRMLScene set up as the Slicer application sets up its own: the selection node
    (application logic), the Markups classes with their .mrk.json storage (Markups logic), and the
    Red, Yellow and Green slice views' layer nodes (Slicer's layout manager makes those)."""
    from slicer import vtkMRMLScene, vtkMRMLSliceCompositeNode, vtkSlicerApplicationLogic, vtkSlicerMarkupsLogic

    made = []

    def make():
        scene = vtkMRMLScene()
        application, markups = vtkSlicerApplicationLogic(), vtkSlicerMarkupsLogic()
        application.SetMRMLScene(scene)
        markups.SetMRMLScene(scene)
        for name in ("Red", "Yellow", "Green"):
            composite = vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(name)
            composite.SetSingletonTag(name)
            scene.AddNode(composite)
        made.append((scene, application, markups))  # the logics live as long as their scene
        return scene

    yield make
    for _, application, markups in made:
        markups.SetMRMLScene(None)
        application.SetMRMLScene(None)


@pytest.fixture
def make_volume(scene):
    """make_volume(array[i, j, k], ijk_to_ras=None, name=...) -> a scalar volume node in ``scene``."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    def make(array, ijk_to_ras=None, name="CT abdomen", node_class="vtkMRMLScalarVolumeNode"):
        array = np.asarray(array)
        components = array.shape[3] if array.ndim == 4 else 1
        image = vtkImageData()
        image.SetDimensions(*array.shape[:3])
        # VTK stores x (i) fastest: the [k, j, i] C-order ravel of the array
        flat = np.ascontiguousarray(np.moveaxis(array.reshape(*array.shape[:3], components), (0, 1, 2), (2, 1, 0)))
        image.GetPointData().SetScalars(numpy_to_vtk(flat.reshape(-1, components), deep=True))
        node = scene.AddNewNodeByClass(node_class, name)
        node.SetAndObserveImageData(image)
        if ijk_to_ras is not None:
            matrix = vtkMatrix4x4()
            for r in range(4):
                for c in range(4):
                    matrix.SetElement(r, c, float(ijk_to_ras[r][c]))
            node.SetIJKToRASMatrix(matrix)
        return node

    return make
