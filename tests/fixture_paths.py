"""Where the official golden fixture sets are: ../shared/fixtures beside the checkout, or
$ST2V_FIXTURES."""
import os
import pathlib

FIXTURES = pathlib.Path(os.environ.get("ST2V_FIXTURES", pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
