"""The lab: what measures the methods. Nothing in the methods imports it."""
