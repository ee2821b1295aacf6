from appliance.service import serviceMaker as pacsAppliance  # noqa: F401
