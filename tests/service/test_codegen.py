"""The committed generated protobuf code is what protoc makes of the .proto now."""

from retromem.service.codegen import stale


def test_generated_code_is_up_to_date():
    assert stale() == [], "run `python -m retromem.service.codegen` and commit the result"
