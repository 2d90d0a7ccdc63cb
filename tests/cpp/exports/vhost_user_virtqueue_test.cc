// Unit tests of the split virtqueue walker (cpp/exports/vhost_user/virtqueue.h) over a ring in
// ordinary memory: chains, indirect tables, and every way a guest can get a chain wrong.
#include "exports/vhost_user/virtqueue.h"

#include <gtest/gtest.h>

#include "vhost_user_ring.h"

namespace blockd::exports::vhost_user {
namespace {

using testing::TestRing;
constexpr uint64_t kB = TestRing::kBuffers;

int pop(TestRing& ring, Chain& chain, std::string& error) {
  return ring.queue.pop(ring.memory, chain, error);
}

TEST(VirtqueueTest, PopsAChainOfReadableThenWritableBuffers) {
  TestRing ring;
  ring.describe(3, kB, 16, kDescNext, 5);
  ring.describe(5, kB + 4096, 4096, kDescNext | kDescWrite, 1);
  ring.describe(1, kB + 8192, 1, kDescWrite);
  ring.offer(3);
  Chain chain;
  std::string error;
  ASSERT_EQ(pop(ring, chain, error), 1) << error;
  EXPECT_EQ(chain.head, 3);
  ASSERT_EQ(chain.readable.size(), 1u);
  ASSERT_EQ(chain.writable.size(), 2u);
  EXPECT_EQ(chain.readable[0].iov_base, ring.at(kB));
  EXPECT_EQ(chain.readable[0].iov_len, 16u);
  EXPECT_EQ(chain.writable[0].iov_base, ring.at(kB + 4096));
  EXPECT_EQ(chain.writable[1].iov_len, 1u);
  EXPECT_EQ(pop(ring, chain, error), 0);
}

TEST(VirtqueueTest, PushFillsTheUsedRingAndPublishesItsIndex) {
  TestRing ring;
  ring.queue.push(6, 513);
  ring.queue.push(2, 1);
  EXPECT_EQ(ring.used_index(), 2);
  EXPECT_EQ(ring.used_id(0), 6u);
  EXPECT_EQ(ring.used_length(0), 513u);
  EXPECT_EQ(ring.used_id(1), 2u);
}

TEST(VirtqueueTest, FollowsAnIndirectTable) {
  TestRing ring;
  const uint64_t table = kB + 0x8000;
  ring.describe(0, kB, 16, kDescNext, 1, table);
  ring.describe(1, kB + 512, 512, kDescNext | kDescWrite, 2, table);
  ring.describe(2, kB + 1024, 1, kDescWrite, 0, table);
  ring.describe(4, table, 3 * 16, kDescIndirect);
  ring.offer(4);
  Chain chain;
  std::string error;
  ASSERT_EQ(pop(ring, chain, error), 1) << error;
  EXPECT_EQ(chain.head, 4);
  EXPECT_EQ(chain.readable.size(), 1u);
  EXPECT_EQ(chain.writable.size(), 2u);
}

// Each malformed chain is refused with a message; nothing outside the memory is touched.
struct BadChain {
  const char* name;
  void (*build)(TestRing& ring);
  const char* error;
};

const BadChain kBadChains[] = {
    {"loop",
     [](TestRing& r) {
       r.describe(0, kB, 16, kDescNext, 1);
       r.describe(1, kB, 16, kDescNext, 0);
       r.offer(0);
     },
     "descriptor chain loops"},
    {"next beyond the table",
     [](TestRing& r) {
       r.describe(0, kB, 16, kDescNext, 8);
       r.offer(0);
     },
     "descriptor index 8 is beyond the table of 8"},
    {"head beyond the table",
     [](TestRing& r) { r.offer(9); },
     "descriptor index 9 is beyond the table of 8"},
    {"buffer outside memory",
     [](TestRing& r) {
       r.describe(0, TestRing::kGuest + TestRing::kBytes - 8, 16, 0);
       r.offer(0);
     },
     "is outside guest memory"},
    {"buffer below memory",
     [](TestRing& r) {
       r.describe(0, 0x1000, 16, 0);
       r.offer(0);
     },
     "buffer at guest address 0x1000 is outside guest memory"},
    {"readable after writable",
     [](TestRing& r) {
       r.describe(0, kB, 16, kDescNext | kDescWrite, 1);
       r.describe(1, kB, 16, 0);
       r.offer(0);
     },
     "device-readable buffer after a device-writable one"},
    {"indirect inside indirect",
     [](TestRing& r) {
       const uint64_t table = kB + 0x8000;
       r.describe(0, table, 16, kDescIndirect, 0, table);
       r.describe(0, table, 16, kDescIndirect);
       r.offer(0);
     },
     "indirect descriptor inside an indirect table"},
    {"indirect with next",
     [](TestRing& r) {
       r.describe(0, kB + 0x8000, 16, kDescIndirect | kDescNext, 1);
       r.offer(0);
     },
     "indirect descriptor that is not a chain of its own"},
    {"indirect table of odd size",
     [](TestRing& r) {
       r.describe(0, kB + 0x8000, 20, kDescIndirect);
       r.offer(0);
     },
     "indirect table of 20 bytes"},
    {"indirect table outside memory",
     [](TestRing& r) {
       r.describe(0, TestRing::kGuest + TestRing::kBytes - 16, 32, kDescIndirect);
       r.offer(0);
     },
     "indirect table is outside guest memory"},
    {"indirect loop",
     [](TestRing& r) {
       const uint64_t table = kB + 0x8000;
       r.describe(0, kB, 16, kDescNext, 1, table);
       r.describe(1, kB, 16, kDescNext, 0, table);
       r.describe(0, table, 32, kDescIndirect);
       r.offer(0);
     },
     "descriptor chain loops"},
    {"available index far ahead",
     [](TestRing& r) { r.set_available_index(100); },
     "available index moved 100 entries ahead in a ring of 8"},
};

class BadChainTest : public ::testing::TestWithParam<BadChain> {};

TEST_P(BadChainTest, IsRefusedWithAMessage) {
  TestRing ring;
  GetParam().build(ring);
  Chain chain;
  std::string error;
  EXPECT_EQ(pop(ring, chain, error), -1);
  EXPECT_NE(error.find(GetParam().error), std::string::npos) << error;
}

INSTANTIATE_TEST_SUITE_P(Chains, BadChainTest, ::testing::ValuesIn(kBadChains),
                         [](const auto& info) {
                           std::string name = info.param.name;
                           for (char& c : name) {
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           }
                           return name;
                         });

TEST(VirtqueueTest, ABufferAcrossTwoAdjacentRegionsBecomesTwoSegments) {
  TestRing ring;
  std::vector<uint8_t> second(4096);
  const uint64_t end = TestRing::kGuest + TestRing::kBytes;
  ring.memory.add_borrowed(end, second.size(), 0, second.data());
  ring.describe(0, end - 100, 200, kDescWrite);
  ring.offer(0);
  Chain chain;
  std::string error;
  ASSERT_EQ(pop(ring, chain, error), 1) << error;
  ASSERT_EQ(chain.writable.size(), 2u);
  EXPECT_EQ(chain.writable[0].iov_len, 100u);
  EXPECT_EQ(chain.writable[1].iov_base, second.data());
  EXPECT_EQ(chain.writable[1].iov_len, 100u);
}

TEST(VirtqueueTest, AChainHoldsAtMostTheSegmentLimit) {
  TestRing ring(1024);
  for (uint16_t i = 0; i < 1024; ++i) {
    ring.describe(i, kB + i, 1, i + 1 < 1024 ? kDescNext : 0, static_cast<uint16_t>(i + 1));
  }
  ring.offer(0);
  Chain chain;
  std::string error;
  ASSERT_EQ(pop(ring, chain, error), 1) << error;
  EXPECT_EQ(chain.readable.size(), 1024u);
  // The same chain with its last buffer across two regions needs one segment more.
  std::vector<uint8_t> second(4096);
  const uint64_t end = TestRing::kGuest + TestRing::kBytes;
  ring.memory.add_borrowed(end, second.size(), 0, second.data());
  ring.describe(1023, end - 1, 2, 0);
  ring.offer(0);
  EXPECT_EQ(pop(ring, chain, error), -1);
  EXPECT_EQ(error, "descriptor chain has more than 1024 buffers");
}

TEST(VirtqueueTest, SizesMustBePowersOfTwo) {
  SplitQueue queue;
  EXPECT_FALSE(queue.set_size(0));
  EXPECT_FALSE(queue.set_size(3));
  EXPECT_FALSE(queue.set_size(65536));
  EXPECT_TRUE(queue.set_size(32768));
  EXPECT_TRUE(queue.set_size(1));
}

TEST(VirtqueueTest, RingsOutsideTheMemoryTableAreRefused) {
  TestRing ring;
  SplitQueue queue;
  ASSERT_TRUE(queue.set_size(256));
  VringAddress address;
  address.descriptors = TestRing::kUser;
  address.available = TestRing::kUser + 0x4000;
  address.used = TestRing::kUser + TestRing::kBytes - 16;  // the used ring would run past the end
  EXPECT_FALSE(queue.set_addresses(ring.memory, address));
  address.used = TestRing::kUser + 0x8000;
  EXPECT_TRUE(queue.set_addresses(ring.memory, address));
  SplitQueue unsized;
  EXPECT_FALSE(unsized.set_addresses(ring.memory, address));
}

TEST(VirtqueueTest, NotifiesUnlessTheDriverSuppressesInterrupts) {
  TestRing ring;
  ring.queue.push(0, 1);
  EXPECT_TRUE(ring.queue.should_notify());
  ring.set_available_flags(kAvailNoInterrupt);
  ring.queue.push(1, 1);
  EXPECT_FALSE(ring.queue.should_notify());
}

TEST(VirtqueueTest, EventIndexNotifiesWhenUsedPassesTheDriversMark) {
  TestRing ring;
  ring.queue.set_event_index(true);
  ring.queue.push(0, 1);
  EXPECT_TRUE(ring.queue.should_notify());  // the first completion always signals
  ring.set_used_event(2);                   // tell me when used index passes 2
  ring.queue.push(1, 1);                    // used index 2
  EXPECT_FALSE(ring.queue.should_notify());
  ring.queue.push(2, 1);  // used index 3: entry 2 is now used
  EXPECT_TRUE(ring.queue.should_notify());
}

TEST(VirtqueueTest, EventIndexAsksForTheNextKick) {
  TestRing ring;
  ring.queue.set_event_index(true);
  ring.describe(0, kB, 16, 0);
  ring.offer(0);
  Chain chain;
  std::string error;
  ASSERT_EQ(pop(ring, chain, error), 1);
  EXPECT_FALSE(ring.queue.arm_kick());
  EXPECT_EQ(ring.available_event(), 1);
  ring.offer(0);  // arrived before the driver saw avail_event: pop again
  EXPECT_TRUE(ring.queue.arm_kick());
}

}  // namespace
}  // namespace blockd::exports::vhost_user
