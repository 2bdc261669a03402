"""`sensor-ingest simulate`: a city's mixed sensor fleet publishing over MQTT, for demos and load.

- patterns: the daily pattern of each kind of device (pure)
- families: payload encoders, one function per family, and the sources they need (pure)
- faults:   the faults that can be switched on, and what the service makes of them (pure)
- fleet:    devices built from a seed, and the Simulator that turns times into messages (pure)
- gaps:     scripted gaps, drops and backfill windows (pure)
- tally:    counts of a run (pure, thread-safe)
- display:  the rich progress table and summary
- options:  the subcommand's options
- run:      the I/O shell: paho client, pacing, signals
"""
