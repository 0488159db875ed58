"""The few Qt names the module uses: Slicer's PythonQt ``qt`` inside Slicer, else qtpy.

PythonQt puts every class in one ``qt`` module and cannot declare new Python signals, so the
module's widgets report user actions through plain Python callbacks instead of Qt signals.
"""

from __future__ import annotations

try:  # inside Slicer: PythonQt
    import qt as _qt

    QtCore = QtGui = QtWidgets = _qt
except ImportError:  # plain Python: qtpy picks PySide6 / PyQt
    from qtpy import QtCore, QtGui, QtWidgets

Qt = QtCore.Qt
QCoreApplication = QtCore.QCoreApplication
QTimer = QtCore.QTimer
QTextCursor = QtGui.QTextCursor
QAbstractItemView = QtWidgets.QAbstractItemView
QApplication = QtWidgets.QApplication
QCheckBox = QtWidgets.QCheckBox
QComboBox = QtWidgets.QComboBox
QDoubleSpinBox = QtWidgets.QDoubleSpinBox
QFileDialog = QtWidgets.QFileDialog
QFormLayout = QtWidgets.QFormLayout
QHBoxLayout = QtWidgets.QHBoxLayout
QHeaderView = QtWidgets.QHeaderView
QLabel = QtWidgets.QLabel
QLineEdit = QtWidgets.QLineEdit
QPlainTextEdit = QtWidgets.QPlainTextEdit
QProgressBar = QtWidgets.QProgressBar
QPushButton = QtWidgets.QPushButton
QSpinBox = QtWidgets.QSpinBox
QTableWidget = QtWidgets.QTableWidget
QTableWidgetItem = QtWidgets.QTableWidgetItem
QTextBrowser = QtWidgets.QTextBrowser
QVBoxLayout = QtWidgets.QVBoxLayout
QWidget = QtWidgets.QWidget


def prop(obj, name: str):
    """Read a Qt property (``value``, ``count``, ``currentText``...): PythonQt exposes it as an
    attribute, PySide and PyQt as a getter method."""
    value = getattr(obj, name)
    return value() if callable(value) else value
