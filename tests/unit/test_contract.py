"""The generated stubs are current, and every RPC has a handler and a caller."""

import inspect
import subprocess
import sys

from agent import wire as agent_wire
from controller.fleet import EnrollmentService, FleetService
from proto import fleet_pb2
from proto import fleet_pb2_grpc


def test_generated_stubs_are_current():
    proc = subprocess.run([sys.executable, "-m", "proto.generate", "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_rpc_has_a_controller_handler_and_an_agent_caller():
    handlers = {"Enrollment": EnrollmentService, "Fleet": FleetService}
    caller_source = inspect.getsource(agent_wire)
    services = fleet_pb2.DESCRIPTOR.services_by_name
    assert set(services) == set(handlers)
    for name, service in services.items():
        base = getattr(fleet_pb2_grpc, f"{name}Servicer")
        for method in service.methods:
            implemented = getattr(handlers[name], method.name)
            assert implemented is not getattr(base, method.name), f"{name}.{method.name} has no handler"
            assert f"{name}Stub(" in caller_source and f".{method.name}(" in caller_source, \
                f"{name}.{method.name} has no caller in agent/wire.py"


def test_both_sides_agree_on_the_message_limit():
    from controller import server
    from controller import wire as controller_wire

    assert agent_wire.MAX_MESSAGE_BYTES == controller_wire.MAX_MESSAGE_BYTES
    options = dict(server.FLEET_OPTIONS)
    assert options["grpc.max_send_message_length"] == controller_wire.MAX_MESSAGE_BYTES
    assert options["grpc.max_receive_message_length"] == controller_wire.MAX_MESSAGE_BYTES
    assert dict(server.ENROLL_OPTIONS)["grpc.max_receive_message_length"] <= 64 * 1024
