"""The PC's fixed addresses, ports and interrupt lines: one home for every hardware constant.

Devices take their base address from here when they are registered on a bus; register
offsets *inside* a device live in that device's module.
"""

# --- Guest physical memory layout -------------------------------------------------------
BOOT_SECTOR_ADDR = 0x7C00          # where firmware loads sector 0 of disk 0
BDA_ADDR = 0x400                   # BIOS data area
BDA_EBDA_SEGMENT = 0x40E           # word: EBDA segment (paragraphs)
BDA_BASE_MEM_KB = 0x413            # word: base memory size in KiB
EBDA_ADDR = 0x9FC00                # extended BIOS data area (last KiB of 639 KiB base memory)
BASE_MEM_KB = 639
MPTABLE_ADDR = EBDA_ADDR           # MP floating pointer + config table live in the EBDA's first KiB
ACPI_TABLES_ADDR = 0xE0000         # RSDP, RSDT, MADT (the mp machine): where the RSDP search begins
CGA_TEXT_ADDR = 0xB8000
CGA_TEXT_SIZE = 0x8000
BIOS_ROM_ADDR = 0xF0000            # 64 KiB of "ROM" (RAM here; the plain PC keeps its BIOS stubs in it)
MULTIBOOT_INFO_ADDR = 0x9000       # where a multiboot loader puts its info struct
DEFAULT_RAM_MIB = 256
MIN_RAM_MIB = 2
MAX_RAM_MIB = 3 * 1024                    # stay below the 0xC0000000+ device window

IOAPIC_ADDR = 0xFEC00000
IOAPIC_SIZE = 0x1000
LAPIC_ADDR = 0xFEE00000
LAPIC_SIZE = 0x1000

# --- Port I/O ----------------------------------------------------------------------------
PIC_MASTER_PORT = 0x20             # 0x20-0x21
PIC_SLAVE_PORT = 0xA0              # 0xA0-0xA1
IMCR_PORT = 0x22                   # 0x22 select, 0x23 data
I8042_DATA_PORT = 0x60
I8042_STATUS_PORT = 0x64           # status on read, command on write
CMOS_PORT = 0x70                   # 0x70 index, 0x71 data
POST_PORT = 0x80                   # POST/delay port: writes ignored quietly
IDE0_CMD_PORT = 0x1F0              # 0x1F0-0x1F7 command block
IDE0_CTRL_PORT = 0x3F6             # device control / alternate status
COM1_PORT = 0x3F8                  # 0x3F8-0x3FF
COM1_PORTS = 8
CGA_CRT_PORT = 0x3D4               # 0x3D4 index, 0x3D5 data
DEBUG_EXIT_PORT = 0x8A00           # Bochs/QEMU debug port (xv6's loader writes it on failure)
DEBUG_CON_PORT = 0xE9              # Bochs debug console (one byte out)

# --- Interrupt lines (ISA IRQ == IOAPIC pin for these) ----------------------------------
IRQ_TIMER = 0
IRQ_KEYBOARD = 1
IRQ_COM1 = 4
IRQ_IDE0 = 14
IOAPIC_PINS = 24

# --- The guest-visible CPU and chipset ----------------------------------------------------
BSP_APIC_ID = 0
MAX_CPUS = 8                       # --cpus: the BSP (APIC ID 0) and APs with APIC IDs 1..7
IOAPIC_ID = 1                      # must match what the MP table says (xv6 checks)
LAPIC_VERSION = 0x14               # integrated APIC
IOAPIC_VERSION = 0x11
LAPIC_BUS_HZ = 1_000_000_000       # LAPIC timer input clock: 1 GHz, as QEMU and KVM model it

# --- Interrupt controller wiring (appended by the interrupt-controller work) ----------------
IRQ_PIC_CASCADE = 2                # master 8259 input driven by the slave's INT output

# --- The plain PC (`--machine pc`: pintos and other guests of the BIOS era) -------------------
MACHINE_KINDS = ("mp", "pc")      # mp: today's MP-spec PC (xv6); pc: a BIOS, the 8254, no MP table
BIOS_CALL_PORT = 0xEE              # our BIOS's stubs `out` here to hand an `int n` to the VMM
BIOS_STUBS_OFFSET = 0x1000         # F000:1000: 256 four-byte stubs, one per vector
BIOS_STUB_SIZE = 4
BDA_CURSOR = 0x450                 # bytes: column, row of page 0's teletype cursor
PIT_PORT = 0x40                    # 0x40-0x42 counters 0-2, 0x43 mode/command
PIT_PORTS = 4
PIT_HZ = 1_193_182                 # the 8254's input clock
SYSTEM_CONTROL_PORT = 0x61         # port B: speaker gate (bit 0) and data (bit 1)
IDE1_CMD_PORT = 0x170              # the secondary IDE channel
IDE1_CTRL_PORT = 0x376
IRQ_IDE1 = 15
POWER_OFF_PORT = 0xB004            # Bochs/old QEMU ACPI PM1a control: 0x2000 powers off
POWER_OFF_VALUE = 0x2000
BOCHS_SHUTDOWN_PORT = 0x8900       # the string "Shutdown", byte by byte, powers off
ISA_DEBUG_EXIT_PORT = 0x501        # QEMU isa-debug-exit: a byte v ends the run with status 2v+1
