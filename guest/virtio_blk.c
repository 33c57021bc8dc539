/*
 * A virtio-blk driver for the disk workload (disk.c). Ring 3, BSP only.
 *
 * It finds the first virtio-blk device on PCI bus 0 through configuration
 * ports 0xcf8/0xcfc, and drives it as a modern (virtio 1.x) PCI device:
 * the vendor capabilities locate the common, notify and device-config
 * regions in the BARs, which it reads but never moves (QEMU's firmware or
 * ferry placed them). It negotiates VERSION_1 plus RO, BLK_SIZE, FLUSH,
 * SEG_MAX and RING_EVENT_IDX when offered, sets up queue 0 as a split ring,
 * and points queue 0 at MSI-X entry 0, which sends VEC_DISK to the BSP.
 *
 * The BARs may lie above the RAM the boot page tables map (ferry puts the
 * 64-bit BAR in a window above RAM): SYS_MAP_UNCACHED maps them, the only
 * ring-0 work here. Completions are found by polling the used ring, which
 * costs no VM exit; a notification is one MMIO write, and with EVENT_IDX
 * only made when the device's avail_event asks for it (the device is not
 * already busy with the ring). The driver asks, through used_event, for an
 * interrupt at the first completion it has not seen yet: ring 3 does not
 * need them, but `irqs=` shows that MSI-X works.
 */
#include "guest.h"
#include "x86.h"
#include "disk.h"

#define PCI_CONFIG_ADDR 0xcf8
#define PCI_CONFIG_DATA 0xcfc
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_HEADER_TYPE 0x0e
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34
#define PCI_CMD_MEM (1u << 1)
#define PCI_CMD_MASTER (1u << 2) /* DMA and MSI need it */
#define PCI_CMD_INTX_OFF (1u << 10)
#define PCI_STATUS_CAPS (1u << 4)
#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11
#define MSIX_ENABLE (1u << 15)
#define MSIX_MASKALL (1u << 14)

#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_BLK_MODERN 0x1042
#define VIRTIO_BLK_TRANSITIONAL 0x1001

/* struct virtio_pci_cap: cfg_type values and field offsets. */
#define VIRTIO_CAP_COMMON 1
#define VIRTIO_CAP_NOTIFY 2
#define VIRTIO_CAP_DEVICE 4
#define VCAP_TYPE 3
#define VCAP_BAR 4
#define VCAP_OFFSET 8
#define VCAP_LENGTH 12
#define VCAP_NOTIFY_MULT 16

/* struct virtio_pci_common_cfg. */
#define CC_DFSELECT 0x00
#define CC_DF 0x04
#define CC_GFSELECT 0x08
#define CC_GF 0x0c
#define CC_MSIX 0x10
#define CC_STATUS 0x14
#define CC_CFGGEN 0x15
#define CC_Q_SELECT 0x16
#define CC_Q_SIZE 0x18
#define CC_Q_MSIX 0x1a
#define CC_Q_ENABLE 0x1c
#define CC_Q_NOFF 0x1e
#define CC_Q_DESC 0x20
#define CC_Q_DRIVER 0x28
#define CC_Q_DEVICE 0x30

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_FAILED 0x80
#define NO_VECTOR 0xffff

/* struct virtio_blk_config. */
#define BLK_CAPACITY 0
#define BLK_SEG_MAX 12
#define BLK_SIZE 20

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define QSIZE_MAX 128

#define MSI_ADDR 0xfee00000u

static const uint64_t wanted_features = 1UL << VIRTIO_F_VERSION_1 | 1UL << VIRTIO_BLK_F_RO |
					1UL << VIRTIO_BLK_F_BLK_SIZE | 1UL << VIRTIO_BLK_F_FLUSH |
					1UL << VIRTIO_BLK_F_SEG_MAX | 1UL << VIRTIO_RING_F_EVENT_IDX;

/* ---- PCI configuration space (bus 0) ------------------------------------ */

static uint32_t pci_read32(uint32_t devfn, uint32_t off)
{
	outl(PCI_CONFIG_ADDR, 0x80000000u | devfn << 8 | (off & 0xfc));
	return inl(PCI_CONFIG_DATA);
}

static uint16_t pci_read16(uint32_t devfn, uint32_t off)
{
	return (uint16_t)(pci_read32(devfn, off) >> 8 * (off & 2));
}

static uint8_t pci_read8(uint32_t devfn, uint32_t off)
{
	return (uint8_t)(pci_read32(devfn, off) >> 8 * (off & 3));
}

static void pci_write16(uint32_t devfn, uint32_t off, uint16_t v)
{
	outl(PCI_CONFIG_ADDR, 0x80000000u | devfn << 8 | (off & 0xfc));
	outw(PCI_CONFIG_DATA + (off & 2), v);
}

/* The address BAR n holds, or 0 for an I/O or unassigned BAR. */
static uint64_t pci_bar(uint32_t devfn, uint32_t n)
{
	uint32_t lo = pci_read32(devfn, PCI_BAR0 + 4 * n);

	if (lo & 1)
		return 0;
	if ((lo & 6) == 4)
		return n < 5 ? (lo & ~0xfUL) | (uint64_t)pci_read32(devfn, PCI_BAR0 + 4 * n + 4) << 32
			     : 0;
	return lo & ~0xfUL;
}

/* devfn of the first virtio-blk function on bus 0, or -1. */
static int find_device(void)
{
	uint32_t slot, fn, id;

	for (slot = 0; slot < 32; slot++) {
		for (fn = 0; fn < 8; fn++) {
			uint32_t devfn = slot << 3 | fn;

			id = pci_read32(devfn, 0);
			if ((id & 0xffff) == 0xffff) {
				if (fn == 0)
					break;
				continue;
			}
			if ((id & 0xffff) == VIRTIO_VENDOR &&
			    (id >> 16 == VIRTIO_BLK_MODERN || id >> 16 == VIRTIO_BLK_TRANSITIONAL))
				return (int)devfn;
			if (fn == 0 && !(pci_read8(devfn, PCI_HEADER_TYPE) & 0x80))
				break;
		}
	}
	return -1;
}

/*
 * The first capability with ID `id` (and, for vendor capabilities, virtio
 * cfg_type `type`), or 0.
 */
static uint8_t find_cap(uint32_t devfn, uint8_t id, uint8_t type)
{
	uint8_t p;
	int guard = 48;

	if (!(pci_read16(devfn, PCI_STATUS) & PCI_STATUS_CAPS))
		return 0;
	for (p = pci_read8(devfn, PCI_CAP_PTR) & 0xfc; p && guard--;
	     p = pci_read8(devfn, p + 1) & 0xfc)
		if (pci_read8(devfn, p) == id &&
		    (id != PCI_CAP_VENDOR || pci_read8(devfn, p + VCAP_TYPE) == type))
			return p;
	return 0;
}

/* ---- mapping device registers ------------------------------------------- */

static char hexdigit(uint32_t v)
{
	return "0123456789abcdef"[v & 15];
}

static bool fail(const struct vblk *d, const char *what)
{
	print("warning: disk: virtio-blk at %c%c.%u: %s; the disk workload is off",
	      hexdigit(d->slot >> 4), hexdigit(d->slot), d->function, what);
	return false;
}

/* Map [addr, addr + len) uncached for ring 3 (a ring-0 request). */
static volatile uint8_t *map(struct vblk *d, uint64_t addr, uint64_t len)
{
	uint64_t used;

	/* At most two 2 MiB pages, each needing at most a PDPT and a PD page. */
	if (len > 2 * MiB || d->pt_left < 4)
		return NULL;
	__asm__ volatile("int $0x80"
			 : "=a"(used)
			 : "D"((uint64_t)SYS_MAP_UNCACHED), "S"(addr), "d"(len), "c"(d->pt_next)
			 : "memory");
	d->pt_next += used * PAGE_SIZE;
	d->pt_left -= (uint32_t)used;
	return (volatile uint8_t *)addr;
}

/* The region a virtio vendor capability describes, mapped; *len gets its length. */
static volatile uint8_t *cap_region(struct vblk *d, uint32_t devfn, uint8_t type, uint8_t *cap,
				    uint32_t *len)
{
	uint64_t base;

	*cap = find_cap(devfn, PCI_CAP_VENDOR, type);
	if (!*cap)
		return NULL;
	base = pci_bar(devfn, pci_read8(devfn, *cap + VCAP_BAR));
	*len = pci_read32(devfn, *cap + VCAP_LENGTH);
	if (!base)
		return NULL;
	return map(d, base + pci_read32(devfn, *cap + VCAP_OFFSET), *len);
}

/* ---- register access ---------------------------------------------------- */

static uint8_t rd8(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint8_t *)(base + off);
}

static uint16_t rd16(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint16_t *)(base + off);
}

static uint32_t rd32(volatile uint8_t *base, uint32_t off)
{
	return *(volatile uint32_t *)(base + off);
}

static void wr8(volatile uint8_t *base, uint32_t off, uint8_t v)
{
	*(volatile uint8_t *)(base + off) = v;
}

static void wr16(volatile uint8_t *base, uint32_t off, uint16_t v)
{
	*(volatile uint16_t *)(base + off) = v;
}

static void wr32(volatile uint8_t *base, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(base + off) = v;
}

/* 64-bit fields as two 32-bit writes, low half first, as the spec allows. */
static void wr64(volatile uint8_t *base, uint32_t off, uint64_t v)
{
	wr32(base, off, (uint32_t)v);
	wr32(base, off + 4, (uint32_t)(v >> 32));
}

/* About 10 s of TSC, for the waits of the setup. */
static uint64_t timeout_cycles(void)
{
	return boot.tsc_khz ? boot.tsc_khz * 10000 : 1UL << 35;
}

/* ---- setup -------------------------------------------------------------- */

static bool negotiate(struct vblk *d)
{
	volatile uint8_t *cc = d->common;
	uint64_t offered, start;

	wr8(cc, CC_STATUS, 0);
	start = rdtsc();
	while (rd8(cc, CC_STATUS))
		if (rdtsc() - start > timeout_cycles())
			return fail(d, "the device did not finish its reset");
	wr8(cc, CC_STATUS, STATUS_ACK);
	wr8(cc, CC_STATUS, STATUS_ACK | STATUS_DRIVER);

	wr32(cc, CC_DFSELECT, 0);
	offered = rd32(cc, CC_DF);
	wr32(cc, CC_DFSELECT, 1);
	offered |= (uint64_t)rd32(cc, CC_DF) << 32;
	if (!(offered & 1UL << VIRTIO_F_VERSION_1))
		return fail(d, "no VERSION_1 (a legacy-only device)");
	d->features = offered & wanted_features;
	wr32(cc, CC_GFSELECT, 0);
	wr32(cc, CC_GF, (uint32_t)d->features);
	wr32(cc, CC_GFSELECT, 1);
	wr32(cc, CC_GF, (uint32_t)(d->features >> 32));
	wr8(cc, CC_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd8(cc, CC_STATUS) & STATUS_FEATURES_OK)) {
		wr8(cc, CC_STATUS, STATUS_FAILED);
		return fail(d, "the device refused our features (FEATURES_OK clear)");
	}
	return true;
}

/* capacity and blk_size, read until config_generation holds still. */
static void read_config(struct vblk *d)
{
	uint32_t gen;

	do {
		gen = rd8(d->common, CC_CFGGEN);
		d->capacity = rd32(d->device, BLK_CAPACITY) |
			      (uint64_t)rd32(d->device, BLK_CAPACITY + 4) << 32;
		d->blk_size = d->features & 1UL << VIRTIO_BLK_F_BLK_SIZE
				      ? rd32(d->device, BLK_SIZE)
				      : SECTOR_SIZE;
	} while (gen != rd8(d->common, CC_CFGGEN));
}

/* MSI-X entry 0 -> VEC_DISK on the BSP, then MSI-X on. */
static bool setup_msix(struct vblk *d, uint32_t devfn, uint32_t apic_id)
{
	uint8_t cap = find_cap(devfn, PCI_CAP_MSIX, 0);
	uint32_t table;
	uint64_t base;
	volatile uint8_t *entry;
	uint16_t ctrl;

	if (!cap)
		return fail(d, "no MSI-X capability");
	table = pci_read32(devfn, cap + 4);
	base = pci_bar(devfn, table & 7);
	if (!base || !(entry = map(d, base + (table & ~7u), 16)))
		return fail(d, "the MSI-X table is not in an assigned memory BAR");
	wr32(entry, 0, MSI_ADDR | apic_id << 12);
	wr32(entry, 4, 0);
	wr32(entry, 8, VEC_DISK); /* fixed delivery, edge */
	wr32(entry, 12, 0);	  /* unmasked */
	ctrl = pci_read16(devfn, cap + 2);
	pci_write16(devfn, cap + 2, (uint16_t)((ctrl | MSIX_ENABLE) & ~MSIX_MASKALL));
	return true;
}

static bool setup_queue(struct vblk *d, uint64_t mem, volatile uint8_t *notify, uint32_t notify_len,
			uint32_t notify_mult)
{
	volatile uint8_t *cc = d->common;
	uint32_t max, size = QSIZE_MAX, off;

	wr16(cc, CC_MSIX, NO_VECTOR);
	wr16(cc, CC_Q_SELECT, 0);
	max = rd16(cc, CC_Q_SIZE);
	if (!max)
		return fail(d, "queue 0 does not exist");
	while (size > max)
		size >>= 1; /* split rings are a power of two long */
	if (size < 3 * VBLK_SLOTS)
		return fail(d, "queue 0 is too short for the driver's requests in flight");
	d->qsize = (uint16_t)size;
	d->desc = (struct virtq_desc *)(mem + DMEM_DESC * PAGE_SIZE);
	d->avail = (struct virtq_avail *)(mem + DMEM_DESC * PAGE_SIZE + 16 * QSIZE_MAX);
	d->used = (volatile struct virtq_used *)(mem + DMEM_USED * PAGE_SIZE);
	d->used_event = &d->avail->ring[size];
	d->avail_event = (volatile uint16_t *)&d->used->ring[size];
	memset(d->desc, 0, PAGE_SIZE);
	memset((void *)d->used, 0, PAGE_SIZE);
	d->avail_idx = d->kicked_idx = d->used_idx = 0;
	d->busy = d->inflight = 0;

	wr16(cc, CC_Q_SIZE, (uint16_t)size);
	wr16(cc, CC_Q_MSIX, 0);
	if (rd16(cc, CC_Q_MSIX) != 0)
		return fail(d, "the device could not give queue 0 MSI-X vector 0");
	wr64(cc, CC_Q_DESC, (uint64_t)d->desc);
	wr64(cc, CC_Q_DRIVER, (uint64_t)d->avail);
	wr64(cc, CC_Q_DEVICE, (uint64_t)d->used);
	off = rd16(cc, CC_Q_NOFF) * notify_mult;
	if (off + 2 > notify_len)
		return fail(d, "queue 0's notification address lies outside the notify region");
	d->notify = (volatile uint16_t *)(notify + off);
	wr16(cc, CC_Q_ENABLE, 1);
	return true;
}

bool vblk_init(struct vblk *d, uint64_t mem, uint32_t apic_id)
{
	volatile uint8_t *notify;
	uint32_t len, notify_len, notify_mult;
	uint8_t cap;
	int devfn = find_device();

	if (devfn < 0) {
		print("warning: disk: no virtio-blk device on PCI bus 0; the disk workload is off");
		return false;
	}
	d->slot = (uint8_t)(devfn >> 3);
	d->function = (uint8_t)(devfn & 7);
	d->pt_next = mem + DMEM_PT * PAGE_SIZE;
	d->pt_left = DMEM_PT_PAGES;
	memset((void *)d->pt_next, 0, DMEM_PT_PAGES * PAGE_SIZE);
	d->slots = (struct vblk_slot *)(mem + DMEM_REQ * PAGE_SIZE);
	d->data = (uint8_t *)(mem + DMEM_DATA * PAGE_SIZE);

	pci_write16((uint32_t)devfn, PCI_COMMAND,
		    pci_read16((uint32_t)devfn, PCI_COMMAND) | PCI_CMD_MEM | PCI_CMD_MASTER |
			    PCI_CMD_INTX_OFF);
	d->common = cap_region(d, (uint32_t)devfn, VIRTIO_CAP_COMMON, &cap, &len);
	if (!d->common || len < CC_Q_DEVICE + 8)
		return fail(d, "no usable common configuration capability");
	d->device = cap_region(d, (uint32_t)devfn, VIRTIO_CAP_DEVICE, &cap, &len);
	if (!d->device || len < BLK_SIZE + 4)
		return fail(d, "no usable device configuration capability");
	notify = cap_region(d, (uint32_t)devfn, VIRTIO_CAP_NOTIFY, &cap, &notify_len);
	if (!notify)
		return fail(d, "no usable notification capability");
	notify_mult = pci_read32((uint32_t)devfn, cap + VCAP_NOTIFY_MULT);

	if (!negotiate(d) || !setup_msix(d, (uint32_t)devfn, apic_id) ||
	    !setup_queue(d, mem, notify, notify_len, notify_mult))
		return false;
	read_config(d);
	if (d->features & 1UL << VIRTIO_BLK_F_SEG_MAX && rd32(d->device, BLK_SEG_MAX) == 0)
		return fail(d, "seg_max is 0: no room for a data segment");
	wr8(d->common, CC_STATUS,
	    STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	return true;
}

/* ---- requests ----------------------------------------------------------- */

static bool has(const struct vblk *d, uint32_t feature)
{
	return d->features >> feature & 1;
}

void vblk_submit(struct vblk *d, uint32_t slot, uint32_t type, uint64_t sector, uint32_t len)
{
	struct vblk_slot *s = &d->slots[slot];
	struct virtq_desc *desc = &d->desc[3 * slot];
	uint16_t head = (uint16_t)(3 * slot);

	s->req.type = type;
	s->req.reserved = 0;
	s->req.sector = sector;
	s->status = 0xff;
	/* Chain head -> [head + 1 ->] head + 2: header, data, status. */
	desc[0].addr = (uint64_t)&s->req;
	desc[0].len = sizeof(s->req);
	desc[0].flags = VIRTQ_DESC_F_NEXT;
	desc[0].next = len ? head + 1 : head + 2;
	desc[1].addr = (uint64_t)vblk_data(d, slot);
	desc[1].len = len;
	desc[1].flags = VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_OUT ? 0 : VIRTQ_DESC_F_WRITE);
	desc[1].next = head + 2;
	desc[2].addr = (uint64_t)&s->status;
	desc[2].len = 1;
	desc[2].flags = VIRTQ_DESC_F_WRITE;
	desc[2].next = 0;
	d->busy |= 1u << slot;
	d->inflight++;
	d->avail->ring[d->avail_idx % d->qsize] = head;
	d->avail_idx++;
	/* The device must see the chain before the index. */
	__atomic_store_n(&d->avail->idx, d->avail_idx, __ATOMIC_RELEASE);
}

void vblk_kick(struct vblk *d)
{
	uint16_t old = d->kicked_idx, now = d->avail_idx;

	if (old == now)
		return;
	d->kicked_idx = now;
	/*
	 * The index must be visible before we read what the device asked for:
	 * a device that goes idle reads the index after writing avail_event, so
	 * one of the two sides sees the other's write.
	 */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (has(d, VIRTIO_RING_F_EVENT_IDX)) {
		/* Did [old, now) cross the entry the device asked to hear about? */
		if ((uint16_t)(now - *d->avail_event - 1) >= (uint16_t)(now - old))
			return;
	} else if (d->used->flags & VIRTQ_USED_F_NO_NOTIFY) {
		return;
	}
	*d->notify = 0;
}

int vblk_reap(struct vblk *d, uint8_t *status)
{
	uint32_t id;

	if (__atomic_load_n(&d->used->idx, __ATOMIC_ACQUIRE) == d->used_idx)
		return -1;
	id = d->used->ring[d->used_idx % d->qsize].id;
	d->used_idx++;
	/* An interrupt for the next completion, whichever it is. */
	*d->used_event = d->used_idx;
	if (id % 3 || id / 3 >= VBLK_SLOTS || !(d->busy >> (id / 3) & 1)) {
		print("warning: disk: the device completed descriptor %u, which heads no request "
		      "in flight; the disk workload is off",
		      id);
		return -2;
	}
	d->busy &= ~(1u << (id / 3));
	d->inflight--;
	*status = d->slots[id / 3].status;
	return (int)(id / 3);
}

bool vblk_run(struct vblk *d, uint32_t type, uint64_t sector, uint32_t len, uint8_t *status)
{
	uint64_t start = rdtsc();
	int slot;

	vblk_submit(d, 0, type, sector, len);
	vblk_kick(d);
	while ((slot = vblk_reap(d, status)) == -1) {
		if (rdtsc() - start > timeout_cycles()) {
			print("warning: disk: no answer to request type %u in 10 s; the disk "
			      "workload is off",
			      type);
			return false;
		}
		cpu_relax();
	}
	return slot >= 0;
}
