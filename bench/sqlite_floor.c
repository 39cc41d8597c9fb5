/* What SQLite alone costs for bench_analyze.py's trace: the same 4.5 M `exits` and 0.5 M
 * `interrupts` rows (same columns, values and order), bound from C with prepared statements, no
 * trace reading, no Python; then the same five indexes. Same settings as the loader's (no
 * journal, no fsync, exclusive lock, 1 GiB cache). No loader, in any language, can load that
 * trace faster than this on the same machine and SQLite.
 *
 *     gcc -O2 bench/sqlite_floor.c -o /tmp/sqlite_floor -lsqlite3 && /tmp/sqlite_floor /tmp/floor.db
 */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void check(int rc, sqlite3 *db)
{
    if (rc != SQLITE_OK && rc != SQLITE_DONE && rc != SQLITE_ROW) {
        fprintf(stderr, "sqlite: %s\n", sqlite3_errmsg(db));
        exit(1);
    }
}

int main(int argc, char **argv)
{
    const char *path = argc > 1 ? argv[1] : "floor.db";
    const long long events = 5000000;
    sqlite3 *db;
    sqlite3_stmt *exits, *interrupts;
    remove(path);
    check(sqlite3_open(path, &db), db);
    check(sqlite3_exec(db, "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; "
                           "PRAGMA locking_mode = EXCLUSIVE; PRAGMA cache_size = -1048576", 0, 0, 0), db);
    check(sqlite3_exec(db, "CREATE TABLE exits (trace_id INTEGER, seq INTEGER, position INTEGER, kind TEXT, "
                           "space TEXT, address INTEGER, size INTEGER, direction TEXT, value INTEGER, "
                           "count INTEGER, rip INTEGER, cpl INTEGER, symbol TEXT); "
                           "CREATE TABLE interrupts (trace_id INTEGER, seq INTEGER, position INTEGER, "
                           "vector INTEGER, source TEXT, rip INTEGER, cpl INTEGER, symbol TEXT, landmark TEXT)",
                       0, 0, 0), db);
    check(sqlite3_prepare_v2(db, "INSERT INTO exits VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", -1, &exits, 0), db);
    check(sqlite3_prepare_v2(db, "INSERT INTO interrupts VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)", -1, &interrupts, 0), db);

    double start = now();
    long long position = 0;
    check(sqlite3_exec(db, "BEGIN", 0, 0, 0), db);
    for (long long i = 0; i < events; i++) {
        int r = i % 10;
        if (r == 9) {                       /* INTERRUPT, 1000, 32, "timer", 0x80104000, 3 */
            position += 1000;
            sqlite3_bind_int64(interrupts, 1, i);
            sqlite3_bind_int64(interrupts, 2, position);
            sqlite3_bind_int(interrupts, 3, 32);
            sqlite3_bind_text(interrupts, 4, "timer", -1, SQLITE_STATIC);
            sqlite3_bind_int64(interrupts, 5, 0x80104000);
            sqlite3_bind_int(interrupts, 6, 3);
            sqlite3_bind_null(interrupts, 7);
            sqlite3_bind_null(interrupts, 8);
            check(sqlite3_step(interrupts), db);
            sqlite3_reset(interrupts);
            continue;
        }
        const char *kind, *space = "pio", *direction;
        long long address, value = 0, rip;
        int size = 1, count = 1;
        if (r < 4) {                        /* PIO_READ, 7, 0x1F7, 1, 0x58, 0x80102345, 0 */
            position += 7; kind = "pio_read"; address = 0x1F7; direction = "read"; value = 0x58; rip = 0x80102345;
        } else if (r < 7) {                 /* PIO_WRITE, 20, 0x3F8, 1, 0x41 + i % 26, 0x80106000, 0 */
            position += 20; kind = "pio_write"; address = 0x3F8; direction = "write"; value = 0x41 + i % 26;
            rip = 0x80106000;
        } else if (r == 7) {                /* PIO_READ_RUN, 3, 0x1F0, 4, 128, [digest], 0x80102400, 0 */
            position += 3; kind = "pio_read_run"; address = 0x1F0; size = 4; direction = "read"; count = 128;
            rip = 0x80102400;
        } else {                            /* MMIO_WRITE, 50, 0xFEE000B0, 4, 0, 0x80102989, 0 */
            position += 50; kind = "mmio_write"; space = "mmio"; address = 0xFEE000B0; size = 4;
            direction = "write"; rip = 0x80102989;
        }
        sqlite3_bind_int64(exits, 1, i);
        sqlite3_bind_int64(exits, 2, position);
        sqlite3_bind_text(exits, 3, kind, -1, SQLITE_STATIC);
        sqlite3_bind_text(exits, 4, space, -1, SQLITE_STATIC);
        sqlite3_bind_int64(exits, 5, address);
        sqlite3_bind_int(exits, 6, size);
        sqlite3_bind_text(exits, 7, direction, -1, SQLITE_STATIC);
        if (r == 7)
            sqlite3_bind_null(exits, 8);
        else
            sqlite3_bind_int64(exits, 8, value);
        sqlite3_bind_int(exits, 9, count);
        sqlite3_bind_int64(exits, 10, rip);
        sqlite3_bind_int(exits, 11, 0);
        sqlite3_bind_null(exits, 12);
        check(sqlite3_step(exits), db);
        sqlite3_reset(exits);
    }
    check(sqlite3_exec(db, "COMMIT", 0, 0, 0), db);
    double inserted = now();
    check(sqlite3_exec(db, "CREATE INDEX idx_exits_trace_id_address ON exits (trace_id, address); "
                           "CREATE INDEX idx_exits_trace_id_symbol ON exits (trace_id, symbol); "
                           "CREATE INDEX idx_exits_trace_id_position ON exits (trace_id, position); "
                           "CREATE INDEX idx_interrupts_trace_id_source ON interrupts (trace_id, source); "
                           "CREATE INDEX idx_interrupts_trace_id_position ON interrupts (trace_id, position)",
                       0, 0, 0), db);
    double indexed = now();
    sqlite3_finalize(exits);
    sqlite3_finalize(interrupts);
    check(sqlite3_close(db), db);
    printf("SQLite %s: %lld rows inserted in %.2f s, indexed in %.2f s: %.2f s, %.0f events/s at best\n",
           sqlite3_libversion(), events, inserted - start, indexed - inserted, indexed - start,
           events / (indexed - start));
    return 0;
}
