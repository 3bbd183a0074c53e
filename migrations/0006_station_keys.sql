-- Station key rotation (`amicus station rekey`). A station hands its key over inside its audit
-- log: an entry signed by the old key that carries the new key and the new key's proof. When
-- the registry's copy of that log takes the entry, the station's key becomes the new one in the
-- same transaction, and the old one is kept here: results it signed still verify, and a
-- retired key is never taken again (by this station or another). Same portability rules as 0001.

CREATE TABLE retired_station_keys (
    key_id TEXT PRIMARY KEY,
    station TEXT NOT NULL,
    public_key TEXT NOT NULL,
    retired_ms BIGINT NOT NULL
);

CREATE INDEX retired_station_keys_station ON retired_station_keys (station);
