"""One router per endpoint, as in MONAI Label: info, volumes, generate (report, ask), detect,
retrieve, jobs (cancel). ``common`` holds what they share: volume lookup and job streaming."""
