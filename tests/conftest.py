"""Test-session settings that must be in place before any test module imports Keras."""

import os
import tempfile
from pathlib import Path

SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "mobilenet_2_5_224_tf_no_top.h5"

# No telemetry from the tools under test.
for name, value in {"DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}.items():
    os.environ.setdefault(name, value)

# Offline ImageNet weights: Keras looks for them in $KERAS_HOME/models/ and would otherwise try
# to download them. A private folder, so tests never touch the user's ~/.keras.
if "KERAS_HOME" not in os.environ and SHARED_WEIGHTS.is_file():
    keras_home = Path(tempfile.gettempdir()) / f"imgpipe-tests-keras-{os.getuid()}"
    (keras_home / "models").mkdir(parents=True, exist_ok=True)
    link = keras_home / "models" / SHARED_WEIGHTS.name
    if not link.exists():
        link.symlink_to(SHARED_WEIGHTS)
    os.environ["KERAS_HOME"] = str(keras_home)
