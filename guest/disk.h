/*
 * The virtio-blk driver (virtio_blk.c) as the disk workload (disk.c) uses
 * it: one modern virtio-pci device, one split virtqueue, one request in
 * flight at a time, whose data is always the one block at `data`.
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
#define VIRTIO_F_VERSION_1 32

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

struct vblk {
	uint8_t slot, function; /* on PCI bus 0 */
	uint64_t features;	/* negotiated */
	uint64_t capacity;	/* in 512-byte sectors */
	uint32_t blk_size;	/* 512 unless the device says otherwise */
	uint16_t qsize, avail_idx, used_idx;
	volatile uint8_t *common; /* struct virtio_pci_common_cfg */
	volatile uint8_t *device; /* struct virtio_blk_config */
	volatile uint16_t *notify; /* queue 0's notification address */
	struct virtq_desc *desc;
	struct virtq_avail *avail;
	volatile struct virtq_used *used;
	struct virtio_blk_req *req;
	volatile uint8_t *status;
	uint8_t *data;	  /* DISK_BLOCK bytes: every request's data */
	uint64_t pt_next; /* zeroed pages left for SYS_MAP_UNCACHED */
	uint32_t pt_left;
};

/* RAM for the driver, in pages of the region disk_setup() gets (DISK_MEM_BYTES). */
#define DMEM_DESC 0 /* descriptor table (2 KiB), then the available ring */
#define DMEM_USED 1
#define DMEM_REQ 2 /* request header, then the status byte */
#define DMEM_DATA 3
#define DMEM_PT 4 /* page-table pages for mapping the BARs */
#define DMEM_PT_PAGES 16

/*
 * Find and set up the first virtio-blk device on PCI bus 0, using the
 * DISK_MEM_BYTES at `mem`. Interrupts go to LAPIC `apic_id`. On failure it
 * prints a `warning: disk: ...` line and returns false.
 */
bool vblk_init(struct vblk *d, uint64_t mem, uint32_t apic_id);

/*
 * Start a request: `len` bytes of d->data (0 for a flush) at `sector`. The
 * device writes d->data for every type but VIRTIO_BLK_T_OUT.
 */
void vblk_submit(struct vblk *d, uint32_t type, uint64_t sector, uint32_t len);

/* Has the request finished? If so, *status gets its status. No port I/O. */
bool vblk_done(struct vblk *d, uint8_t *status);

/* vblk_submit() and wait, at most ~10 s. False (and a warning) on a timeout. */
bool vblk_run(struct vblk *d, uint32_t type, uint64_t sector, uint32_t len, uint8_t *status);

#endif
