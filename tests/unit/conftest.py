import json

import pytest
from unitdata import detect_report


@pytest.fixture
def report_text():
    return lambda **over: json.dumps(detect_report(**over))
