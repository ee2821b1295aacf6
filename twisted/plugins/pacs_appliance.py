from appliance.plugin import serviceMaker as pacsAppliance  # noqa: F401
