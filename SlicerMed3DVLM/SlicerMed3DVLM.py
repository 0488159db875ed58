"""Med3DVLM: reports and chat about CT and MRI volumes with a 3D vision-language model.

The four classes Slicer expects, kept thin: the work is done in SlicerMed3DVLMLib (testable
outside Slicer) and in the embedded ``med3dvlm`` package. Lib modules are imported lazily, so
that Slicer starts even before the module's Python packages are installed.
"""

import logging
import os
import sys

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget,
)


def _use_embedded_core() -> None:
    """A source checkout keeps med3dvlm in ../core; the built extension installs it beside this file."""
    core = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core")
    if os.path.isdir(os.path.join(core, "med3dvlm")) and core not in sys.path:
        sys.path.insert(0, core)


def _why_self_test_cannot_run():
    """Why the self-test must be skipped (extension build machines have no PyTorch), else None."""
    _use_embedded_core()
    from SlicerMed3DVLMLib import dependencies

    refusal = dependencies.unsupported_python()
    if refusal:
        return "Med3DVLM self-test skipped: " + refusal
    missing = dependencies.missing_requirements()
    if missing:
        return ("Med3DVLM self-test skipped: these Python packages are not installed: " + ", ".join(missing)
                + "; open the Med3DVLM module and press Install.")
    return None


def _dicom_lookup(instance_uid: str, tag: str) -> str:
    database = getattr(slicer, "dicomDatabase", None)
    return database.instanceValue(instance_uid, tag) if database is not None and database.isOpen else ""


class SlicerMed3DVLM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Med3DVLM"
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerMed3DVLM contributors"]
        self.parent.helpText = (
            "Pick a CT or MRI volume, press <b>Generate report</b> or type a question: a 3D "
            "vision-language model (Med3DVLM) answers in the chat while Slicer stays responsive. "
            "For MRI, <b>Detect abnormalities</b> scores the abnormalities the model knows. "
            "<b>Show evidence</b> on an answer or a score lays a map of where it came from over the scan; "
            "<b>Model's view</b> shows what the model is given; a <b>Region</b> (a Markups ROI) limits "
            "reports, questions and scores to its box. "
            "Reports and conversations are saved with the scene as text nodes, scores as tables. "
            "Needs 3D Slicer 5.10 or newer (Python 3.12); on first use the module installs PyTorch "
            "(through the PyTorch extension) and its other Python packages. "
            '<a href="https://github.com/SlicerMed3DVLM/SlicerMed3DVLM">Documentation</a>. '
            "Research use only: not for diagnosis."
        )
        self.parent.acknowledgementText = (
            "Based on Med3DVLM (Xin et al., 2025) and MedMAP (Zhu et al., 2026)."
        )


class SlicerMed3DVLMWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        _use_embedded_core()
        # Always there, so that slicer.util.getModuleLogic works before the packages are installed
        # (it returns the widget's ``logic``); the logic builds its core on first use.
        self.logic = SlicerMed3DVLMLogic()
        self.installBox = None
        from SlicerMed3DVLMLib import dependencies

        refusal = dependencies.unsupported_python()
        if refusal:  # Slicer 5.8 or older: nothing to install would help
            self._show_notice(refusal)
            return
        missing = dependencies.missing_requirements()
        if missing:
            self._show_notice("Med3DVLM needs these Python packages:\n" + "\n".join(missing),
                              lambda *_: self._install(missing))
        else:
            self._build_chat()

    def _show_notice(self, text, install=None):
        """A message, and an Install button when ``install`` is given, at the top of the panel.

        The stretch lives inside the box, not in the module layout: the chat added after a
        successful install then gets all the height instead of being squashed below a stretch.
        """
        self.installBox = qt.QWidget()
        layout = qt.QVBoxLayout(self.installBox)
        self.installLabel = qt.QLabel(text)
        self.installLabel.wordWrap = True
        layout.addWidget(self.installLabel)
        if install is not None:
            self.installButton = qt.QPushButton("Install")
            self.installButton.clicked.connect(install)
            layout.addWidget(self.installButton)
        layout.addStretch(1)
        self.layout.addWidget(self.installBox, 1)

    def _install(self, missing):
        from SlicerMed3DVLMLib import dependencies

        self.installButton.enabled = False
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            dependencies.install(missing)
        except dependencies.InstallError as error:
            self.installLabel.text = str(error)
            return
        except Exception as error:  # never a traceback in the panel: one sentence, details in the log
            logging.exception("Med3DVLM: installing the Python packages failed")
            self.installLabel.text = (f"Installing the Python packages failed ({dependencies.failure_reason(error)}); "
                                      "press Install to try again.")
            return
        finally:
            slicer.app.restoreOverrideCursor()
            self.installButton.enabled = True
        self.installBox.hide()
        self.layout.removeWidget(self.installBox)
        self.installBox.deleteLater()
        self.installBox = None
        self._build_chat()

    def _build_chat(self):
        from SlicerMed3DVLMLib.chat_panel import ChatPanel
        from SlicerMed3DVLMLib.controller import ChatController

        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        selector.showChildNodeTypes = False  # no label maps
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.noneEnabled = True
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setToolTip("The CT or MRI volume to report on and ask about")
        selector.connect("currentNodeChanged(vtkMRMLNode*)", self._warn_about_demo_model)
        regions = slicer.qMRMLNodeComboBox()
        regions.nodeTypes = ["vtkMRMLMarkupsROINode"]
        regions.noneEnabled = True
        regions.noneDisplay = "Whole volume"
        regions.addEnabled = False
        regions.removeEnabled = False
        regions.setMRMLScene(slicer.mrmlScene)
        self.panel = ChatPanel(volume_selector=selector, region_selector=regions)
        self.layout.addWidget(self.panel)
        self.controller = ChatController(self.panel, self.logic.core)

    def _warn_about_demo_model(self, node):
        """Once per installation: the demo model knows only phantoms, before it meets a real scan."""
        if node is None:
            return
        from SlicerMed3DVLMLib import demo_notice
        from SlicerMed3DVLMLib.settings import load_settings

        store = qt.QSettings()
        if demo_notice.should_warn(store, load_settings(store).model, node.GetName()):
            demo_notice.mark_warned(store)
            slicer.util.warningDisplay(demo_notice.NOTICE, windowTitle="Med3DVLM demo model")

    def cleanup(self):
        """Module unloaded (Slicer calls it on exit, from aboutToQuit, and on reload): stop the model server."""
        if self.logic is not None:
            self.logic.shutdown()


class SlicerMed3DVLMLogic(ScriptedLoadableModuleLogic):
    """For the Python console:

        logic = slicer.util.getModuleLogic("SlicerMed3DVLM")  # or SlicerMed3DVLMLogic()
        print(logic.generate_report(getNode("CTChest")))
        logic.ask(getNode("CTChest"), "Is there a nodule?", on_token=print, on_done=print)
        logic.ask(getNode("CTChest"), "And here?", region=getNode("R"))   # the box of a Markups ROI
        logic.show_model_view(getNode("CTChest"))                       # the model's input over the scan

    Blocking unless ``on_done`` is given; see SlicerMed3DVLMLib.logic.Med3DVLMLogic for the rest.
    The model runs in a model server process (the module's own, or a remote one from the settings).
    """

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._core = None

    @property
    def core(self):
        """Built on first use: the packages it imports may not be installed when the module opens.
        Its model server stops when Slicer quits, also for a logic made in the Python console
        (which gets no widget cleanup)."""
        if self._core is None:
            _use_embedded_core()
            from SlicerMed3DVLMLib.logic import Med3DVLMLogic

            self._core = Med3DVLMLogic(self._scene or slicer.mrmlScene, store=qt.QSettings(),
                                       dicom_lookup=_dicom_lookup)
            slicer.app.connect("aboutToQuit()", self.shutdown)
        return self._core

    def generate_report(self, volume_node, on_token=None, on_done=None, on_status=None, **framing):
        return self.core.generate_report(volume_node, on_token, on_done, on_status, **framing)

    def ask(self, volume_node, question, on_token=None, on_done=None, on_status=None, **framing):
        return self.core.ask(volume_node, question, on_token, on_done, on_status, **framing)

    def detect(self, volume_node, on_done=None, on_status=None, **framing):
        return self.core.detect(volume_node, on_done, on_status, **framing)

    def show_evidence(self, volume_node, answer, on_done=None, on_status=None):
        return self.core.show_evidence(volume_node, answer, on_done, on_status)

    def show_score_evidence(self, volume_node, label, on_done=None, on_status=None):
        return self.core.show_score_evidence(volume_node, label, on_done, on_status)

    def show_model_view(self, volume_node, on_done=None, on_status=None, **framing):
        return self.core.show_model_view(volume_node, on_done, on_status, **framing)

    def cancel(self):
        return self.core.cancel()

    def restart_server(self):
        return self.core.restart_server()

    def shutdown(self):
        return self._core.shutdown() if self._core is not None else True  # nothing started yet


class SlicerMed3DVLMTest(ScriptedLoadableModuleTest):
    """Runs the bundled demo model on a synthetic CT phantom inside Slicer."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = _why_self_test_cannot_run()
        if reason:  # "Reload and Test" calls runTest directly: a message, not a SkipTest traceback
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_report_and_question_are_stored_in_the_scene()

    def test_report_and_question_are_stored_in_the_scene(self):
        reason = _why_self_test_cannot_run()
        if reason:  # ctest (slicer_add_python_unittest) runs test_* methods through unittest
            self.skipTest(reason)
        _use_embedded_core()
        from med3dvlm.data.phantoms import make_ct_phantom
        from SlicerMed3DVLMLib import text_nodes
        from SlicerMed3DVLMLib.logic import Med3DVLMLogic
        from SlicerMed3DVLMLib.volume_node import node_from_volume

        volume = node_from_volume(slicer.mrmlScene, make_ct_phantom(0, shape=(64, 64, 32)).volume, "CT phantom")
        logic = Med3DVLMLogic(slicer.mrmlScene)  # default settings: the demo model
        try:
            report = logic.generate_report(volume)
            self.assertTrue(report.strip())
            self.assertTrue(logic.ask(volume, "Is there a lesion in the liver?").strip())
            roles = {text_nodes.record_role(node) for node in logic.records(volume)}
            self.assertEqual(roles, {text_nodes.REPORT_ROLE, text_nodes.CONVERSATION_ROLE})
        finally:
            self.assertTrue(logic.shutdown())
        self.delayDisplay("Test passed")
