"""Device hardware profiles as TOML data, with their loader and schema."""

from firmware_profiles.loader import list_profiles, load_all, load_profile, parse_profile
from firmware_profiles.schema import DeviceProfile, ProfileError

__all__ = [
    "DeviceProfile",
    "ProfileError",
    "list_profiles",
    "load_all",
    "load_profile",
    "parse_profile",
]
