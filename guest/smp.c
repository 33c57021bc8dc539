/*
 * Finding and starting the application processors (ring 0).
 *
 * The list of CPUs comes from ACPI's MADT when there is one (QEMU), else
 * from the Intel MP table (ferry writes one; SeaBIOS writes one too, but
 * lists only the first CPU of each package, so it comes second). Each AP
 * listed gets INIT, then two startup IPIs pointing at the trampoline, as
 * the MP spec describes. With neither table we broadcast the same sequence
 * to all-but-self, and ring 3 counts whoever arrives within a bounded wait
 * (user.c).
 */
#include "guest.h"
#include "x86.h"

/* MP floating pointer structure ("_MP_"), MP spec 1.4 section 4.1. */
struct mp_floating {
	char signature[4];
	uint32_t config_paddr;
	uint8_t length; /* in 16-byte units */
	uint8_t spec_rev;
	uint8_t checksum;
	uint8_t features[5];
};

/* MP configuration table header ("PCMP"), section 4.2. */
struct mp_config {
	char signature[4];
	uint16_t length;
	uint8_t spec_rev;
	uint8_t checksum;
	char oem_id[8];
	char product_id[12];
	uint32_t oem_table;
	uint16_t oem_table_size;
	uint16_t entry_count;
	uint32_t lapic_paddr;
	uint16_t ext_length;
	uint8_t ext_checksum;
	uint8_t reserved;
};

#define MP_ENTRY_PROCESSOR 0
#define MP_CPU_ENABLED 1

/* ACPI root pointer ("RSD PTR "), ACPI 6.x section 5.2.5. */
struct acpi_rsdp {
	char signature[8];
	uint8_t checksum;
	char oem_id[6];
	uint8_t revision; /* 0: RSDT only; 2: XSDT too */
	uint32_t rsdt_paddr;
	uint32_t length;
	uint64_t xsdt_paddr;
	uint8_t ext_checksum;
	uint8_t reserved[3];
} __attribute__((packed));

struct acpi_header {
	char signature[4];
	uint32_t length;
	uint8_t revision;
	uint8_t checksum;
	char oem_id[6];
	char oem_table_id[8];
	uint32_t oem_revision;
	uint32_t creator_id;
	uint32_t creator_revision;
};

#define MADT_ENTRIES_OFFSET 44 /* header, LAPIC address, flags */
#define MADT_LOCAL_APIC 0
#define MADT_CPU_ENABLED 1

static uint8_t ap_apic_ids[MAX_CPUS];
static uint32_t nr_aps;

static uint8_t checksum(const void *p, uint32_t len)
{
	const uint8_t *b = p;
	uint8_t sum = 0;

	while (len--)
		sum += *b++;
	return sum;
}

static bool sig_is(const char *sig, const char *want, uint32_t len)
{
	return !strncmp(sig, want, len);
}

static void add_ap(uint32_t apic_id)
{
	if (apic_id != cpus[0].apic_id && apic_id < 0xff && nr_aps < MAX_CPUS - 1)
		ap_apic_ids[nr_aps++] = (uint8_t)apic_id;
}

/*
 * One pass over the BIOS area looking for both tables, 16 bytes at a step
 * (this loop is emulated under PVM, so it compares one word per step).
 */
static void scan_bios_area(uint64_t start, uint64_t end, const struct mp_floating **mp,
			   const struct acpi_rsdp **rsdp)
{
	for (; start < end; start += 16) {
		uint32_t w = *(const uint32_t *)start;

		if (w == 0x5f504d5f && !*mp && !checksum((const void *)start, 16))
			*mp = (const void *)start; /* "_MP_" */
		else if (w == 0x20445352 && !*rsdp && sig_is((const char *)start, "RSD PTR ", 8) &&
			 !checksum((const void *)start, 20))
			*rsdp = (const void *)start; /* "RSD " */
	}
}

/* The table the XSDT (or RSDT) lists with signature `sig`, NULL if none. */
static const struct acpi_header *acpi_table(const struct acpi_rsdp *rsdp, const char *sig)
{
	const struct acpi_header *root, *t;
	uint32_t i, n, width;

	if (rsdp->revision >= 2 && rsdp->xsdt_paddr)
		root = (const void *)rsdp->xsdt_paddr, width = 8;
	else
		root = (const void *)(uint64_t)rsdp->rsdt_paddr, width = 4;
	n = (root->length - sizeof(*root)) / width;
	for (i = 0; i < n; i++) {
		const uint8_t *entry = (const uint8_t *)(root + 1) + i * width;
		uint64_t paddr = width == 8 ? *(const uint64_t *)entry : *(const uint32_t *)entry;

		t = (const void *)paddr;
		if (sig_is(t->signature, sig, 4))
			return t;
	}
	return NULL;
}

static bool madt_cpus(const struct acpi_rsdp *rsdp)
{
	const struct acpi_header *t = acpi_table(rsdp, "APIC");
	const uint8_t *e, *end;

	if (!t)
		return false;
	e = (const uint8_t *)t + MADT_ENTRIES_OFFSET;
	end = (const uint8_t *)t + t->length;
	for (; e + 2 <= end && e[1] >= 2; e += e[1])
		if (e[0] == MADT_LOCAL_APIC && (*(const uint32_t *)(e + 4) & MADT_CPU_ENABLED))
			add_ap(e[3]);
	return true;
}

/*
 * The FADT's SLEEP_CONTROL_REG (ACPI 6.x, 5.2.9): a Generic Address Structure
 * at offset 244 of a table that long; only one in system I/O space is used.
 */
#define FADT_SLEEP_CONTROL 244
#define GAS_SYSTEM_IO 1

static uint16_t fadt_sleep_port(const struct acpi_rsdp *rsdp)
{
	const struct acpi_header *t = acpi_table(rsdp, "FACP");
	const uint8_t *gas;

	if (!t || t->length < FADT_SLEEP_CONTROL + 12)
		return 0;
	gas = (const uint8_t *)t + FADT_SLEEP_CONTROL;
	if (gas[0] != GAS_SYSTEM_IO)
		return 0;
	return (uint16_t)*(const uint64_t *)(gas + 4);
}

static bool mp_cpus(const struct mp_floating *f)
{
	const struct mp_config *cfg;
	const uint8_t *e, *end;

	if (!f->config_paddr)
		return false; /* a "default configuration": no processor list */
	cfg = (const struct mp_config *)(uint64_t)f->config_paddr;
	if (!sig_is(cfg->signature, "PCMP", 4))
		return false;
	e = (const uint8_t *)(cfg + 1);
	end = (const uint8_t *)cfg + cfg->length;
	while (e < end) {
		if (*e != MP_ENTRY_PROCESSOR) {
			e += 8; /* bus, I/O APIC, interrupt entries */
			continue;
		}
		if (e[3] & MP_CPU_ENABLED)
			add_ap(e[1]);
		e += 20;
	}
	return true;
}

/*
 * Remember the APIC IDs of the APs. Returns the CPU count including the
 * BSP, 0 if neither table was found.
 */
uint32_t find_cpus(void)
{
	const struct mp_floating *mp = NULL;
	const struct acpi_rsdp *rsdp = (const void *)boot.rsdp_paddr;

	scan_bios_area(0xe0000, 0x100000, &mp, &rsdp);
	if (!mp && !rsdp)
		scan_bios_area(0x9fc00, 0xa0000, &mp, &rsdp); /* last KiB of base memory */
	if (rsdp)
		boot.sleep_port = fadt_sleep_port(rsdp);
	if (rsdp && madt_cpus(rsdp))
		return nr_aps + 1;
	if (mp && mp_cpus(mp))
		return nr_aps + 1;
	return 0;
}

static void send_ipi(uint32_t dest_apic, uint32_t icr_lo)
{
	uint32_t spins = 0;

	lapic_write(APIC_ICR_HI, dest_apic << 24);
	lapic_write(APIC_ICR_LO, icr_lo);
	/* KVM and QEMU deliver at once; a real LAPIC may take a moment. */
	while ((lapic_read(APIC_ICR_LO) & APIC_ICR_BUSY) && ++spins < 1000)
		cpu_relax();
}

#define ICR_INIT (APIC_ICR_ASSERT | 0x500)    /* INIT, level assert */
#define ICR_STARTUP (APIC_ICR_ASSERT | 0x600) /* STARTUP, vector in bits 7:0 */

void start_aps(void)
{
	uint32_t i, pass;

	memcpy((void *)TRAMPOLINE_BASE, trampoline_start,
	       (size_t)(trampoline_end - trampoline_start));

	if (boot.expected_cpus == 1)
		return; /* uniprocessor */

	/* INIT, wait 10 ms, STARTUP, wait 200 us, STARTUP (MP spec B.4). */
	if (boot.expected_cpus) {
		for (i = 0; i < nr_aps; i++)
			send_ipi(ap_apic_ids[i], ICR_INIT);
	} else {
		send_ipi(0, APIC_ICR_ALL_BUT_SELF | ICR_INIT);
	}
	lapic_delay_us(10000);
	for (pass = 0; pass < 2; pass++) {
		if (boot.expected_cpus) {
			for (i = 0; i < nr_aps; i++)
				send_ipi(ap_apic_ids[i], ICR_STARTUP | SIPI_VECTOR);
		} else {
			send_ipi(0, APIC_ICR_ALL_BUT_SELF | ICR_STARTUP | SIPI_VECTOR);
		}
		lapic_delay_us(200);
	}
}
