"""Rules between keys of a run.toml: each value was checked alone by :mod:`config_rules`;
these add what one key means for another (credentials and TLS, signing keys, the FL baseline's
limits, the model's pooling layout), each problem worded with the key to change.
"""

from __future__ import annotations

from collections.abc import Mapping


def check_cross_fields(data: Mapping[str, object], problems: list[str]) -> None:
    """Append the problems between keys of a run.toml laid out as a dict (each value already checked alone)."""
    broker = data.get("broker")
    if isinstance(broker, dict):
        if broker.get("password_file") is not None and broker.get("username") is None:
            problems.append("broker.password_file: is set but broker.username is not")
        _check_broker_plaintext(broker, problems)
    _check_signing(data.get("security"), broker if isinstance(broker, dict) else {}, problems)
    metrics = data.get("metrics")
    if isinstance(metrics, dict) and (metrics.get("dashboard_tls_cert") is None) != (metrics.get("dashboard_tls_key") is None):
        given, missing = ("cert", "key") if metrics.get("dashboard_tls_cert") is not None else ("key", "cert")
        problems.append(f"metrics.dashboard_tls_{missing}: needed with dashboard_tls_{given} (HTTPS takes both)")
    problems += model_layout(data.get("model"))
    training, quant = data.get("training"), data.get("quant")
    if isinstance(training, dict) and isinstance(quant, dict):
        if training.get("mode") == "fl" and quant.get("bits") == "auto":
            problems.append("quant.bits: 'auto' allocates for split activations, which training.mode = 'fl' does "
                            "not send (devices upload the whole model); set a fixed bit-width")
    compute = data.get("compute")
    if isinstance(training, dict) and isinstance(compute, dict) and training.get("mode") == "fl":
        trainers = compute.get("trainers", 1)
        if isinstance(trainers, int) and trainers > 1:
            problems.append("compute.trainers: training.mode = 'fl' trains nothing on the server (devices train the "
                            "whole model), so it runs one trainer; set compute.trainers = 1")
    if isinstance(quant, dict) and quant.get("gradient_bits") == "auto" and quant.get("bits") != "auto":
        problems.append("quant.gradient_bits: 'auto' is chosen by the allocator, which runs with quant.bits = 'auto'; "
                        "set quant.bits = 'auto' or a fixed gradient_bits")


def _check_signing(security: object, broker: Mapping[str, object], problems: list[str]) -> None:
    """Signed mode needs both key files; a provisioned fleet (broker credentials) must say
    whether it signs; keys with signing off are a mistake."""
    from server_runtime.config import SecuritySection  # lazy: that module imports this one

    security = security if isinstance(security, dict) else {}
    signing = security.get("signing", SecuritySection.signing)
    keys = [f"security.{k}" for k in ("signing_key", "device_keys") if security.get(k) is not None]
    if signing == "ed25519" and len(keys) < 2:
        problems.append("security.signing: 'ed25519' needs security.signing_key (the server's private key) and "
                        "security.device_keys (the fleet.json with the device keys); sflam fleet provision writes both")
    elif signing in ("off", "auto") and keys:
        problems.append(f"{' and '.join(keys)}: set, but security.signing is {signing!r}; set signing = 'ed25519'")
    elif signing == "auto" and broker.get("username") is not None:
        problems.append("security.signing: a broker with credentials is a provisioned fleet, whose messages are signed: "
                        "set signing = 'ed25519' with signing_key and device_keys, or signing = 'off' to run unsigned")


def _check_broker_plaintext(broker: Mapping[str, object], problems: list[str]) -> None:
    """Credentials or a CA file with a plaintext mqtt:// URL to a host that is not loopback, unless
    broker.insecure_plaintext (:func:`edge_runtime.mqtt.plaintext_problem`, which the link applies too)."""
    from edge_runtime.mqtt import BrokerAddress, plaintext_problem
    from server_runtime.config import BrokerSection

    url = broker.get("url", BrokerSection.url)
    try:
        address = BrokerAddress.parse(url) if isinstance(url, str) else None
    except ValueError:
        address = None  # reported by rule.broker_url
    if address is None:
        return
    given = [f"broker.{key}" for key in ("username", "password_file", "ca_file") if broker.get(key) is not None]
    problem = plaintext_problem(address, given, insecure=broker.get("insecure_plaintext") is True,
                                opt_in="set broker.insecure_plaintext = true")
    if problem is not None:
        problems.append(f"broker.url: {problem}")


def model_layout(model: object) -> list[str]:
    """A [model] pooling layout that cannot be built (token pooling without a class token)."""
    if isinstance(model, Mapping) and model.get("class_token") is False and model.get("global_pool") == "token":
        return ["model.class_token: false needs model.global_pool = 'avg' (pooling 'token' reads the class token)"]
    return []
