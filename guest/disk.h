/*
 * The virtio-blk driver (virtio_blk.c) as the disk workload (disk.c) uses
 * it: one modern virtio-pci device, one split virtqueue, and VBLK_SLOTS
 * request slots. A slot is one request in flight: its own three
 * descriptors (3 * slot .. 3 * slot + 2), header, status byte and 4 KiB data
 * block, so up to VBLK_SLOTS requests run at once and finish in any order.
 */
#ifndef FERRY_DISK_H
#define FERRY_DISK_H

#include "guest.h"

#define DISK_BLOCK 4096
#define SECTOR_SIZE 512 /* virtio-blk addresses 512-byte sectors whatever blk_size says */

/* Request types and statuses (virtio 1.x, 5.2.6). */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_ID_BYTES 20

/* Feature bits the driver takes when offered. */
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_RING_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32

#define VIRTQ_USED_F_NO_NOTIFY 1

/* Request slots: requests in flight at most. */
#define VBLK_SLOTS 9

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];
};

struct virtq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct virtq_used {
	uint16_t flags;
	uint16_t idx;
	struct virtq_used_elem ring[];
};

struct virtio_blk_req {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* A slot's header and status, 32 bytes apart in the DMEM_REQ page. */
struct vblk_slot {
	struct virtio_blk_req req;
	volatile uint8_t status;
	uint8_t pad[15];
};

struct vblk {
	uint8_t slot, function; /* on PCI bus 0 */
	uint64_t features;	/* negotiated */
	uint64_t capacity;	/* in 512-byte sectors */
	uint32_t blk_size;	/* 512 unless the device says otherwise */
	uint16_t qsize;
	uint16_t avail_idx;  /* next free entry of the available ring */
	uint16_t kicked_idx; /* avail_idx when vblk_kick() last looked */
	uint16_t used_idx;   /* next used entry to look at */
	uint32_t busy;	     /* bit s: slot s has a request in flight */
	uint32_t inflight;   /* requests in flight: bits set in busy */
	volatile uint8_t *common;  /* struct virtio_pci_common_cfg */
	volatile uint8_t *device;  /* struct virtio_blk_config */
	volatile uint16_t *notify; /* queue 0's notification address */
	struct virtq_desc *desc;
	struct virtq_avail *avail;
	volatile struct virtq_used *used;
	volatile uint16_t *used_event;	/* EVENT_IDX: after the available ring */
	volatile uint16_t *avail_event; /* EVENT_IDX: after the used ring */
	struct vblk_slot *slots;
	uint8_t *data;	  /* VBLK_SLOTS blocks of DISK_BLOCK bytes, one per slot */
	uint64_t pt_next; /* zeroed pages left for SYS_MAP_UNCACHED */
	uint32_t pt_left;
};

/* RAM for the driver, in pages of the region disk_setup() gets (DISK_MEM_BYTES). */
#define DMEM_DESC 0 /* descriptor table (2 KiB), then the available ring */
#define DMEM_USED 1
#define DMEM_REQ 2  /* the slots' headers and status bytes */
#define DMEM_DATA 3 /* VBLK_SLOTS pages: the slots' data blocks */
#define DMEM_PT (DMEM_DATA + VBLK_SLOTS) /* page-table pages for mapping the BARs */
#define DMEM_PT_PAGES 16
#define DMEM_PAGES (DMEM_PT + DMEM_PT_PAGES)

/*
 * Find and set up the first virtio-blk device on PCI bus 0, using the
 * DISK_MEM_BYTES at `mem`. Interrupts go to LAPIC `apic_id`. On failure it
 * prints a `warning: disk: ...` line and returns false.
 */
bool vblk_init(struct vblk *d, uint64_t mem, uint32_t apic_id);

/* Slot `slot`'s data block. */
static inline uint8_t *vblk_data(const struct vblk *d, uint32_t slot)
{
	return d->data + (uint64_t)slot * DISK_BLOCK;
}

/*
 * Make a request available on free slot `slot`: `len` bytes of its data
 * block (0 for a flush) at `sector`. The device writes the data for every
 * type but VIRTIO_BLK_T_OUT. The device hears of it at the next vblk_kick().
 */
void vblk_submit(struct vblk *d, uint32_t slot, uint32_t type, uint64_t sector, uint32_t len);

/*
 * Notify the device of the requests submitted since the last call, if it
 * asked to be (EVENT_IDX's avail_event, else the used ring's NO_NOTIFY).
 * One MMIO write, or nothing.
 */
void vblk_kick(struct vblk *d);

/*
 * The slot of the next request the used ring reports finished (its status in
 * *status), -1 if none, or -2 (and a warning) if the device reported a
 * descriptor that heads no request in flight. No port I/O.
 */
int vblk_reap(struct vblk *d, uint8_t *status);

/*
 * Submit on slot 0, with nothing else in flight, and wait, at most ~10 s.
 * False (and a warning) on a timeout.
 */
bool vblk_run(struct vblk *d, uint32_t type, uint64_t sector, uint32_t len, uint8_t *status);

#endif
