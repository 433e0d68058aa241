"""SoftHSM2 support for jarvis-secretsd tests and development: config template, provisioning, fixtures."""

from pathlib import Path

TEMPLATE = Path(__file__).with_name("softhsm2.conf.template")
PROVISION_SCRIPT = Path(__file__).with_name("provision-token.sh")
