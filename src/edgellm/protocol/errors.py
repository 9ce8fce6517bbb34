"""Error codes shared by the unit manager and units (spec 1 §5), with their messages.

The codes and messages are those of the C++ StackFlow / Edge-LLM-Infra; clients match on
the numbers, so they never change.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    OK = 0
    RESET = -1
    JSON_FORMAT = -2
    ACTION_MATCH = -3
    INFERENCE_PUSH = -4
    MODEL_LOADING = -5
    UNIT_NOT_EXIST = -6
    UNKNOWN_OPERATION = -7
    UNIT_RESOURCE = -8
    UNIT_CALL = -9
    MODEL_INIT = -10
    MODEL_RUN = -11
    NOT_INITIALISED = -12
    ALREADY_WORKING = -13
    NOT_WORKING = -14
    FILE_ERROR = -17
    NO_UNIT_ACTION = -18
    LINK = -20
    TASK_FULL = -21
    CONFIG = -22
    UNSUPPORTED_LINK = -22  # upstream's other name for -22
    BASE64 = -23
    EMPTY_INFERENCE = -24
    STREAM_INDEX = -25

    @property
    def message(self) -> str:
        return MESSAGES[self]


MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.OK: "",
    ErrorCode.RESET: "reset",
    ErrorCode.JSON_FORMAT: "json format error",
    ErrorCode.ACTION_MATCH: "action match false",
    ErrorCode.INFERENCE_PUSH: "inference data push false",
    ErrorCode.MODEL_LOADING: "model loading failed",
    ErrorCode.UNIT_NOT_EXIST: "unit does not exist",
    ErrorCode.UNKNOWN_OPERATION: "unknown operation",
    ErrorCode.UNIT_RESOURCE: "unit resource allocation failed",
    ErrorCode.UNIT_CALL: "unit call false",
    ErrorCode.MODEL_INIT: "model init failed",
    ErrorCode.MODEL_RUN: "model run failed",
    ErrorCode.NOT_INITIALISED: "not initialised",
    ErrorCode.ALREADY_WORKING: "already working",
    ErrorCode.NOT_WORKING: "not working",
    ErrorCode.FILE_ERROR: "file error",
    ErrorCode.NO_UNIT_ACTION: "not have unit action",
    ErrorCode.LINK: "link false",
    ErrorCode.TASK_FULL: "task full",
    ErrorCode.CONFIG: "config error",
    ErrorCode.BASE64: "base64 decoding error",
    ErrorCode.EMPTY_INFERENCE: "inference data is empty",
    ErrorCode.STREAM_INDEX: "stream data index error",
}
